"""virtio 1.x: split virtqueues, the modern PCI transport and the pmem device."""
