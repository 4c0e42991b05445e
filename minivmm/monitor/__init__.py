"""The monitor: QMP on a UNIX socket, the human monitor on the console, and the command
table both share (`commands.py`), over the machine's user-creatable objects and devices
(`objects.py`). QEMU's QMP reference (docs/interop/qmp-spec, qapi/*.json) is the model for
names, argument shapes, replies, error classes and events."""
