"""``GET /openapi.json`` and ``GET /docs`` (Swagger UI, vendored under ``static/vendor/``).

The viewer's files are served by this server (no CDN), and its online validator, which
would send the document elsewhere, is switched off.
"""

from __future__ import annotations

from aiohttp import web

from aiotranscribe.api.openapi_spec import openapi_document

routes = web.RouteTableDef()

VIEWER = "static/vendor/swagger-ui"
# Relative URLs, so the page also works behind a proxy that mounts the server under a prefix.
DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aiotranscribe API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{VIEWER}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{VIEWER}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
}});
</script>
</body>
</html>
"""


@routes.get("/openapi.json")
async def openapi_json(_request: web.Request) -> web.StreamResponse:
    return web.json_response(openapi_document())


@routes.get("/docs")
async def docs(_request: web.Request) -> web.StreamResponse:
    return web.Response(text=DOCS_PAGE, content_type="text/html")
