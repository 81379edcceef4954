from twisted.application.service import ServiceMaker

stickyproxy = ServiceMaker(  # type: ignore[no-untyped-call]
    "stickyproxy",
    "stickyproxy.tap",
    "A sticky HTTP/WebSocket reverse proxy (PROXY protocol, persistence cookie, health checks)",
    "stickyproxy",
)
