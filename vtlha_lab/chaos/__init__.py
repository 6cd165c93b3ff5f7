"""The chaos suite (``vtlha-lab chaos``): seeded faults over the network lab, an observer
that shares no code with the services, a pure checker over one history file, a report.

Modules, one job each: ``faults`` (the fault table, the only copy of the expectations),
``docs`` (the docs generated from it), ``inject`` (one injector per fault kind),
``hostile`` (hostile input), ``supervisor`` (restarts killed services), ``observer``
(ARP, kernel state, reservations; standard library only), ``live`` (the runner's view of
recovery), ``runner``, ``checker`` (pure), ``report`` (markdown and pictures), ``cli``."""
