"""The request path, one module per stage (auth, parse, classify, route, cache, call, cascade, relay,
log), each with one entry point; `tm_gateway.proxy.Proxy` runs them in order over a `context.Ctx`."""
