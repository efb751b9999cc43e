//! The API's OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes
//! and the request and response types (`GET /api/v1/openapi.json`), and a page that shows it
//! to people (`GET /api/v1/docs`), rendered here from the same document so it needs nothing
//! from the network.

use std::fmt::Write;
use std::sync::OnceLock;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Required};
use utoipa::{Modify, OpenApi};

use super::{conversations, devices, files, records, widget};
use crate::server::Body;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conversation gateway HTTP API",
        description = "Contacts, inboxes, conversations, messages, widget sessions and files. \
            Every call but a widget session's takes `Authorization: Bearer <JWT>` (the socket's \
            tokens); every error is `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        records::create_room,
        records::put_contact,
        records::get_contact,
        records::list_contacts,
        records::put_inbox,
        records::get_inbox,
        records::list_inboxes,
        records::open_conversation,
        conversations::list,
        conversations::get,
        conversations::update,
        conversations::messages,
        conversations::send,
        conversations::broadcast,
        widget::open_session,
        files::upload,
        files::download,
        files::get_limits,
        files::put_limits,
        devices::register,
        devices::list,
        devices::remove,
    ),
    components(schemas(super::ErrorBody, storage::Message, storage::records::FileRecord)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "conversations", description = "The team's inbox: open, read, list, manage"),
        (name = "messages", description = "A conversation's messages; broadcasts"),
        (name = "contacts"), (name = "inboxes"), (name = "rooms"),
        (name = "widget", description = "Sessions of the website widget"),
        (name = "files", description = "Uploads and downloads"),
        (name = "devices", description = "The devices a user gets pushes on"),
    )
)]
struct ApiDoc;

/// Declares the bearer scheme every operation refers to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document, built once.
pub(crate) fn spec() -> &'static utoipa::openapi::OpenApi {
    static SPEC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    SPEC.get_or_init(ApiDoc::openapi)
}

fn respond(content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Body::from(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// `GET /api/v1/openapi.json`.
pub(crate) fn document() -> Response<Body> {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    let json = JSON.get_or_init(|| serde_json::to_vec_pretty(spec()).unwrap_or_default());
    respond("application/json", json.clone())
}

/// `GET /api/v1/docs`: every operation with its parameters, body and answers.
pub(crate) fn page() -> Response<Body> {
    static HTML: OnceLock<Vec<u8>> = OnceLock::new();
    let html = HTML.get_or_init(|| render(spec()).into_bytes());
    respond("text/html; charset=utf-8", html.clone())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn render(spec: &utoipa::openapi::OpenApi) -> String {
    let mut out = String::new();
    let title = escape(&spec.info.title);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}\
         h2{{border-top:1px solid #ddd;padding-top:1rem}}code{{background:#f4f4f4;padding:0 .2em}}\
         .m{{font-weight:bold;text-transform:uppercase;margin-right:.5em}}</style></head><body>\
         <h1>{title} <small>{}</small></h1><p>{}</p>\
         <p>Machine-readable: <a href=\"/api/v1/openapi.json\">openapi.json</a> (OpenAPI 3.1).</p>",
        escape(&spec.info.version),
        escape(spec.info.description.as_deref().unwrap_or("")),
    );
    for (path, item) in &spec.paths.paths {
        let operations = [
            ("get", &item.get),
            ("post", &item.post),
            ("patch", &item.patch),
            ("put", &item.put),
            ("delete", &item.delete),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation {
                render_operation(&mut out, method, path, operation);
            }
        }
    }
    out.push_str("</body></html>");
    out
}

fn render_operation(out: &mut String, method: &str, path: &str, operation: &Operation) {
    let _ = write!(
        out,
        "<h2><span class=\"m\">{method}</span><code>{}</code></h2><p>{}</p>",
        escape(path),
        escape(
            operation
                .description
                .as_deref()
                .or(operation.summary.as_deref())
                .unwrap_or("")
        ),
    );
    if let Some(parameters) = &operation.parameters {
        out.push_str("<p>Parameters:</p><ul>");
        for parameter in parameters {
            let required = matches!(parameter.required, Required::True);
            let _ = write!(
                out,
                "<li><code>{}</code> (in {}{}) {}</li>",
                escape(&parameter.name),
                serde_json::to_value(&parameter.parameter_in)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                if required { ", required" } else { "" },
                escape(parameter.description.as_deref().unwrap_or("")),
            );
        }
        out.push_str("</ul>");
    }
    if let Some(body) = &operation.request_body {
        let types: Vec<String> = body.content.keys().map(|k| escape(k)).collect();
        let schema = body
            .content
            .values()
            .next()
            .and_then(|c| c.schema.as_ref())
            .map(schema_name)
            .unwrap_or_default();
        let _ = write!(
            out,
            "<p>Body: <code>{}</code> {}</p>",
            types.join(", "),
            escape(&schema)
        );
    }
    out.push_str("<p>Answers:</p><ul>");
    for (status, response) in &operation.responses.responses {
        let description = match response {
            RefOr::T(response) => response.description.clone(),
            RefOr::Ref(reference) => reference.ref_location.clone(),
        };
        let _ = write!(
            out,
            "<li><code>{}</code> {}</li>",
            escape(status),
            escape(&description)
        );
    }
    out.push_str("</ul>");
}

fn schema_name(schema: &RefOr<utoipa::openapi::schema::Schema>) -> String {
    match schema {
        RefOr::Ref(reference) => reference
            .ref_location
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_owned(),
        RefOr::T(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_and_names_every_route() {
        let json = serde_json::to_value(spec()).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/api/v1/conversations/{room_id}/messages",
            "/api/v1/widget/sessions",
            "/api/v1/files/{file_id}",
            "/api/v1/broadcast",
        ] {
            assert!(json["paths"].get(path).is_some(), "{path} missing");
        }
        assert!(json["components"]["securitySchemes"]["bearer"].is_object());
        let page = render(spec());
        assert!(page.contains("/api/v1/widget/sessions"));
    }
}
