"""A test service: the real ``Service`` base (outbox, drain loop, NATS) that emits
``EMITTER_COUNT`` events ``test.emitted`` (data ``i``) as it starts, then idles. Run as
``python -m tests.integration.emitter --config FILE --node NODE --nats URL ...``."""

from __future__ import annotations

import os
from typing import Any

from vtlha.service import Service, service_command


class Emitter(Service):
    name = "emitter"
    http_port_key = "heartbeat"

    async def start(self) -> None:
        for i in range(int(os.environ.get("EMITTER_COUNT", "0"))):
            await self.emit("test.emitted", f"event {i}", data={"i": i})

    def status(self) -> dict[str, Any]:
        return {"pending": len(self.outbox.pending())}


main = service_command(Emitter)

if __name__ == "__main__":
    main()
