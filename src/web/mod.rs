//! The read-only status page the agent serves on its listener: an overview of the sources, each
//! source's runs, the tenants (by drift class), one tenant's state, drift, document and versions,
//! and the audit trail; each page with a JSON twin under `/api/v1/`. Works without JavaScript.
//!
//! Safe by construction: only GET and HEAD (the router answers 405 to anything else; the login
//! form's POST is the one exception), every string escaped ([`html`]), a policy that allows no
//! script and no framing, no secret value anywhere (documents and drift are redacted before they
//! get here), lists bounded, and a short cache in front of PostgreSQL.

mod html;
mod svg;

use crate::config::SourceConfig;
use crate::domain::history::{self, Version};
use crate::status::{self, AuditStatus, SourceStatus, Status};
use crate::store::history::Lifecycle;
use crate::store::pages::{self, EventRow, Hour, TenantBook, TenantRow};
use crate::store::runs::{self, RunRecord};
use crate::store::{self, StoreError};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use deadpool_postgres::Pool;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a page is served from memory: a refresh storm reaches PostgreSQL once a second or so.
const CACHE_FOR: Duration = Duration::from_secs(2);
/// Pages kept at most; past it the oldest go.
const CACHE_ENTRIES: usize = 256;
/// Hours the overview's charts cover.
const CHART_HOURS: i32 = 7 * 24;
/// Versions a tenant page shows, newest first.
const VERSIONS_SHOWN: usize = 50;

pub const POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const SESSION_COOKIE: &str = "frostbyte_status";

/// Pages by path and query, with when they were built.
type Cache = HashMap<String, (Instant, Response<Bytes>)>;

#[derive(Clone)]
pub struct PageState {
    pool: Pool,
    sources: Arc<Vec<SourceConfig>>,
    /// Asked of every reader when set.
    token: Option<Arc<String>>,
    cache: Arc<Mutex<Cache>>,
}

impl PageState {
    pub fn new(pool: Pool, sources: Vec<SourceConfig>, token: Option<String>) -> PageState {
        PageState {
            pool,
            sources: Arc::new(sources),
            token: token.map(Arc::new),
            cache: Arc::default(),
        }
    }
}

#[derive(Serialize)]
pub struct Overview {
    pub status: Status,
    pub hours: Vec<Hour>,
}

#[derive(Serialize)]
pub struct SourcePage {
    pub status: SourceStatus,
    pub runs: Vec<RunRecord>,
}

#[derive(Serialize)]
pub struct TenantList {
    pub class: Option<String>,
    pub tenants: Vec<TenantRow>,
    /// Where the next page starts, when there is one.
    pub next_after: Option<String>,
}

#[derive(Serialize)]
pub struct TenantPage {
    pub tenant_id: String,
    pub lifecycle: Lifecycle,
    pub book: TenantBook,
    /// As the row holds it, secrets redacted.
    pub document: serde_json::Value,
    /// The newest [`VERSIONS_SHOWN`], oldest first.
    pub versions: Vec<Version>,
}

#[derive(Serialize)]
pub struct AuditPage {
    pub audit: AuditStatus,
    pub events: Vec<EventRow>,
    pub next_before: Option<i64>,
}

/// The status page's routes, with its headers on every response.
pub fn routes(state: PageState) -> axum::Router {
    axum::Router::new()
        .route("/", get(overview))
        .route("/api/v1/overview", get(overview))
        .route("/sources/{name}", get(source))
        .route("/api/v1/sources/{name}", get(source))
        .route("/tenants", get(tenants))
        .route("/api/v1/tenants", get(tenants))
        .route("/tenants/{id}", get(tenant))
        .route("/api/v1/tenants/{id}", get(tenant))
        .route("/audit", get(audit))
        .route("/api/v1/audit", get(audit))
        .route(
            "/static/style.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], html::STYLE) }),
        )
        .route("/login", get(login_form).post(login))
        .layer(axum::middleware::map_response(page_headers))
        .with_state(state)
}

async fn page_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// What a page needs, read from the database.
enum Built {
    Page(String, serde_json::Value),
    NotFound(String),
}

/// The cookie a successful login sets: derived from the token, so the cookie is no bearer token.
fn session_of(token: &str) -> String {
    hex::encode(Sha256::digest(format!("frostbyte status session\0{token}").as_bytes()))
}

fn same(a: &str, b: &str) -> bool {
    Sha256::digest(a.as_bytes()) == Sha256::digest(b.as_bytes())
}

fn allowed(state: &PageState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else { return true };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|b| same(b, token)) {
        return true;
    }
    let session = session_of(token);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .any(|c| same(c, &session))
}

/// Serves the page at `uri`: from the cache when fresh, else built; HTML or, under `/api/v1/`,
/// its JSON.
async fn serve<F, Fut>(state: &PageState, headers: &HeaderMap, uri: &Uri, build: F) -> Response
where
    F: FnOnce(PageState) -> Fut,
    Fut: Future<Output = Result<Built, StoreError>>,
{
    let json = uri.path().starts_with("/api/");
    if !allowed(state, headers) {
        return match json {
            true => (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "application/json")],
                "{\"error\": \"status_token required\"}\n",
            )
                .into_response(),
            false => (StatusCode::UNAUTHORIZED, html_type(), html::login(None)).into_response(),
        };
    }
    let key = uri.to_string();
    if let Some(hit) = cached(state, &key) {
        return hit;
    }
    let response = match build(state.clone()).await {
        Ok(Built::Page(page, _)) if !json => (StatusCode::OK, html_type(), page).into_response(),
        Ok(Built::Page(_, value)) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], format!("{value:#}\n")).into_response(),
        Ok(Built::NotFound(what)) if !json => (StatusCode::NOT_FOUND, html_type(), html::not_found(&what)).into_response(),
        Ok(Built::NotFound(what)) => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{:#}\n", serde_json::json!({"error": what})),
        )
            .into_response(),
        Err(e) => {
            let text = crate::compose::first_line(&e);
            tracing::warn!(error = %text, "a status page could not be read from the database");
            let body = html::not_found(&format!("the database could not be read: {text}"));
            return (StatusCode::SERVICE_UNAVAILABLE, html_type(), body).into_response();
        }
    };
    remember(state, key, response).await
}

fn html_type() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "text/html; charset=utf-8")]
}

fn cached(state: &PageState, key: &str) -> Option<Response> {
    let cache = state.cache.lock().expect("page cache");
    let (at, r) = cache.get(key)?;
    (at.elapsed() < CACHE_FOR).then(|| {
        let mut copy = Response::builder().status(r.status());
        for (k, v) in r.headers() {
            copy = copy.header(k, v);
        }
        copy.body(axum::body::Body::from(r.body().clone())).expect("a copied response")
    })
}

async fn remember(state: &PageState, key: String, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be read back\n").into_response();
    };
    let mut cache = state.cache.lock().expect("page cache");
    cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
    if cache.len() < CACHE_ENTRIES {
        let mut kept = Response::builder().status(parts.status);
        for (k, v) in &parts.headers {
            kept = kept.header(k, v);
        }
        cache.insert(key, (Instant::now(), kept.body(bytes.clone()).expect("a kept response")));
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The query's value of `name`, decoded.
fn param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
    })
}

fn page(html: String, value: &impl Serialize) -> Result<Built, StoreError> {
    Ok(Built::Page(html, serde_json::to_value(value).expect("a page serialises")))
}

async fn overview(State(state): State<PageState>, headers: HeaderMap, uri: Uri) -> Response {
    serve(&state.clone(), &headers, &uri, async |s| {
        let client = store::client(&s.pool).await?;
        let sources: Vec<&SourceConfig> = s.sources.iter().collect();
        let o = Overview {
            status: status::gather(&**client, &sources).await?,
            hours: pages::hours(&**client, CHART_HOURS).await?,
        };
        page(html::overview(&o), &o)
    })
    .await
}

async fn source(State(state): State<PageState>, Path(name): Path<String>, headers: HeaderMap, uri: Uri) -> Response {
    serve(&state.clone(), &headers, &uri, async |s| {
        let Some(src) = s.sources.iter().find(|c| c.name == name) else {
            return Ok(Built::NotFound(format!("no source named {name}")));
        };
        let client = store::client(&s.pool).await?;
        let mut status = status::gather(&**client, &[src]).await?;
        let p = SourcePage {
            status: status.sources.remove(0),
            runs: runs::recent_runs(&**client, &name, pages::PAGE_ROWS).await?,
        };
        page(html::source(&p), &p)
    })
    .await
}

async fn tenants(State(state): State<PageState>, headers: HeaderMap, uri: Uri) -> Response {
    let class = param(&uri, "drift").filter(|c| !c.is_empty());
    if let Some(c) = class.as_deref().filter(|c| c.parse::<crate::domain::drift::DriftClass>().is_err()) {
        return (StatusCode::BAD_REQUEST, html_type(), html::not_found(&format!("no drift class {c}"))).into_response();
    }
    let after = param(&uri, "after").unwrap_or_default();
    serve(&state.clone(), &headers, &uri, async |s| {
        let client = store::client(&s.pool).await?;
        let tenants = pages::tenants(&**client, class.as_deref(), &after).await?;
        let next_after = (tenants.len() as i64 == pages::PAGE_ROWS)
            .then(|| tenants.last().map(|t| t.tenant_id.clone()))
            .flatten();
        let l = TenantList { class, tenants, next_after };
        page(html::tenants(&l), &l)
    })
    .await
}

async fn tenant(State(state): State<PageState>, Path(id): Path<String>, headers: HeaderMap, uri: Uri) -> Response {
    serve(&state.clone(), &headers, &uri, async |s| {
        let client = store::client(&s.pool).await?;
        let Some(lifecycle) = store::history::lifecycle(&**client, &id).await? else {
            return Ok(Built::NotFound(format!("no tenant {id}")));
        };
        let row = store::load_actual_for(&**client, std::slice::from_ref(&id)).await?.pop();
        let document = row.map_or(serde_json::Value::Null, |r| {
            crate::domain::json::redact(&r.document.value(), "", &r.known_secrets)
        });
        let events = store::history::tenant_events(&**client, &id).await?;
        let mut versions = history::replay(&events).unwrap_or_else(|e| {
            tracing::warn!(tenant = %id, error = %e, "the tenant's audit trail cannot be replayed");
            vec![]
        });
        versions.drain(..versions.len().saturating_sub(VERSIONS_SHOWN));
        let p = TenantPage {
            book: pages::tenant_book(&**client, &id).await?,
            tenant_id: id,
            lifecycle,
            document,
            versions,
        };
        page(html::tenant(&p), &p)
    })
    .await
}

async fn audit(State(state): State<PageState>, headers: HeaderMap, uri: Uri) -> Response {
    let before = param(&uri, "before").and_then(|b| b.parse().ok()).unwrap_or(i64::MAX);
    serve(&state.clone(), &headers, &uri, async |s| {
        let client = store::client(&s.pool).await?;
        let events = pages::events(&**client, before).await?;
        let head = runs::audit_head(&**client).await?;
        let p = AuditPage {
            audit: AuditStatus {
                head_seq: head.as_ref().map(|h| h.0),
                head_hash: head.map(|h| h.1),
                last_check: runs::last_audit_check(&**client).await?,
            },
            next_before: (events.len() as i64 == pages::PAGE_ROWS).then(|| events.last().map(|e| e.seq)).flatten(),
            events,
        };
        page(html::audit(&p), &p)
    })
    .await
}

async fn login_form() -> Response {
    (StatusCode::OK, html_type(), html::login(None)).into_response()
}

/// The form's token, checked; right, a session cookie (HttpOnly, SameSite=Strict) and the overview.
async fn login(State(state): State<PageState>, body: Bytes) -> Response {
    let Some(token) = &state.token else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    };
    let given = String::from_utf8_lossy(&body)
        .split('&')
        .find_map(|p| p.strip_prefix("token="))
        .map(|v| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    if !same(&given, token) {
        return (StatusCode::UNAUTHORIZED, html_type(), html::login(Some("That token is not the status token."))).into_response();
    }
    let cookie = format!("{SESSION_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", session_of(token));
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/".to_string()), (header::SET_COOKIE, cookie)]).into_response()
}
