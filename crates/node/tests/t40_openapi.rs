//! The OpenAPI document checked in as `crates/api/openapi.json` is the one the handlers
//! generate. Run with `STARLING_BLESS=1` to rewrite it after changing the API.

#[test]
fn t40_checked_in_openapi_document_is_up_to_date() {
    let generated = starling_node::api::openapi_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.json");
    if std::env::var_os("STARLING_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is stale: run `STARLING_BLESS=1 cargo test -p starling-node --test t40_openapi`",
        path.display()
    );
    let doc: serde_json::Value =
        serde_json::from_str(&generated).unwrap_or_else(|e| panic!("not JSON: {e}"));
    assert_eq!(doc["openapi"], "3.1.0");
    for path in ["/v1/nodes", "/v1/kv/{key}", "/v1/watch", "/v1/certs"] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
}
