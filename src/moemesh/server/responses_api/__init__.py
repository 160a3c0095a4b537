"""OpenAI's Responses API (POST /v1/responses), stateless: schemas (request body), convert (input
items, instructions, tools -> the internal chat shape), shapes (answer and stream-event shapes, for
the OpenAPI document), render (an outcome as a Response object; a generation as its event
stream), routes (the router)."""
