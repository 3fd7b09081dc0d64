//! compose/: the Frostbyte stack as the foundation plan names it. `docker-compose config` (in CI)
//! checks the syntax; this checks what the stack promises.

use serde_json::{Value, json};

fn load(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("compose").join(name);
    frostbyte_gitops::parse::yaml(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

#[test]
fn every_service_is_pinned_and_health_checked_and_starts_in_order() {
    let c = load("docker-compose.yml");
    let services = c["services"].as_object().unwrap();
    for name in ["postgres", "minio", "redis", "qdrant", "embeddings", "migrate", "agent"] {
        assert!(services.contains_key(name), "no {name}");
    }
    for (name, s) in services {
        let image = s["image"].as_str().unwrap_or_else(|| panic!("{name}: no image"));
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(!tag.is_empty() && tag != "latest", "{name}: image {image} is not pinned");
        if !["migrate", "agent"].contains(&name.as_str()) {
            assert!(s["healthcheck"]["test"].is_array(), "{name}: no healthcheck");
        }
    }
    assert_eq!(services["migrate"]["depends_on"]["postgres"]["condition"], json!("service_healthy"));
    assert_eq!(services["agent"]["depends_on"]["migrate"]["condition"], json!("service_completed_successfully"));
    assert_eq!(services["migrate"]["command"], json!(["migrate", "--app-role", "frostbyte_app"]));
    let agent_url = services["agent"]["environment"]["FROSTBYTE_CONTROL_DB_URL"].as_str().unwrap();
    assert!(
        agent_url.starts_with("postgres://frostbyte_app:"),
        "the agent runs as the app role: {agent_url}"
    );
    assert_eq!(services["agent"]["environment"]["FROSTBYTE_EMBEDDING_ENDPOINT"], json!("http://embeddings:80"));
}

#[test]
fn the_offline_variant_has_no_route_out() {
    let c = load("docker-compose.offline.yml");
    assert_eq!(c["networks"]["backend"]["internal"], json!(true));
    let base = load("docker-compose.yml");
    for (name, s) in base["services"].as_object().unwrap() {
        assert_eq!(s["networks"], json!(["backend"]), "{name} is not on the backend network only");
    }
}
