"""IMU2CLIP on top of mmloader: an IMU encoder trained against frozen CLIP towers.

The encoder, towers, trainer and evaluation land with their issues; this package depends on mmloader,
never the reverse.
"""

__version__ = "0.1.0"
