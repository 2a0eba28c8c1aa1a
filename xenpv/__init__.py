"""xenpv: an emulator of Xen's paravirtual split-driver model."""

__version__ = "0.1.0"
