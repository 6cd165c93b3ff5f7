"""Storage fencing with SCSI-3 persistent reservations over iSCSI, in userspace:
libiscsi (``libiscsi.so.7``) through ctypes (``docs/storage.md``).

- :mod:`vtlha.iscsi.libiscsi`: the ctypes declarations and their layout checks;
- :mod:`vtlha.iscsi.scsi`: pure — keys, the reservation type, sense, PR IN data;
- :mod:`vtlha.iscsi.session`: one session (one path, one LUN) on a thread of its own,
  every call bounded, no silent reconnects, unit attentions retried, the permit guard;
- :mod:`vtlha.iscsi.reservation`: taking and giving up a LUN's reservation.
"""
