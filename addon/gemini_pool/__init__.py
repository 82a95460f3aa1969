"""gemini-proxy's pure logic (config, selector, breaker, classify, routing, store) and the addon."""
