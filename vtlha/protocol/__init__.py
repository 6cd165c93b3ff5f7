"""Sans-I/O protocol state machines: they take messages and the current time and return
what to send and do; the services carry it out (DESIGN.md "Shape of the code")."""
