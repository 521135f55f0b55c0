// Swagger UI on /openapi.json, as FastAPI's get_swagger_ui_html sets it up; a file of its
// own because the page's Content-Security-Policy allows no inline script.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis],
  // Never send the document to swagger.io's online validator.
  validatorUrl: null,
});
