"""minivmm: a miniature x86-64 virtual machine monitor on Linux KVM."""

__version__ = "0.1.0"
