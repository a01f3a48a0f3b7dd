"""mmloader: timestamp-aligned multimodal windows from egocentric recordings.

>>> import mmloader
>>> ds = mmloader.open("sample:ego4d")            # or open("ego4d", root=...), or open(store_url)
>>> ds.info()["recordings"]
"""

from ._version import __version__  # noqa: E402

from .api import Dataset, open  # noqa: E402,A004
from .recipes.custom import InputError, Recording, TimeSeriesInput, write_store  # noqa: E402
from .errors import MediaError, MMLoaderError, SourceFormatError, StoreFormatError  # noqa: E402
from .store import Store, StoreWriter  # noqa: E402
from .video.transcode import VIDEO_PROFILES, VideoProfile  # noqa: E402

__all__ = [
    "Dataset",
    "InputError",
    "Recording",
    "TimeSeriesInput",
    "VIDEO_PROFILES",
    "VideoProfile",
    "write_store",
    "MMLoaderError",
    "MediaError",
    "SourceFormatError",
    "Store",
    "StoreFormatError",
    "StoreWriter",
    "WindowSet",
    "WindowSpec",
    "__version__",
    "open",
]


def __getattr__(name: str):
    # torch is imported only when windows are used: `import mmloader` and the CLI stay light
    if name == "WindowSet":
        from .windows.dataset import WindowSet

        return WindowSet
    if name == "WindowSpec":
        from .windows.spec import WindowSpec

        return WindowSpec
    if name in _DEPRECATED_MODULES:  # ``import mmloader; mmloader.byo.write_store`` kept working for one release
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mmloader' has no attribute {name!r}")


_DEPRECATED_MODULES = ("adapters", "byo", "collate", "dataset", "media", "resample", "schema", "windowset")
