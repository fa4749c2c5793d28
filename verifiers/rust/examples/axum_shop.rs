//! An axum API that serves only the calls a person approved through
//! Countersign. Run with:
//!
//! ```sh
//! CS_ISSUER=https://tenant.example.auth0.com/ \
//! CS_AUDIENCE=https://shop.example/api \
//! CS_JWKS_URI=https://tenant.example.auth0.com/.well-known/jwks.json \
//! cargo run -p countersign-verify --example axum_shop
//! ```

use axum::{routing::post, Extension, Router};
use countersign_verify::{Approval, Config, Verifier, VerifyLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let verifier = Verifier::new(Config {
        required_scopes: vec!["product:buy".into()],
        ..Config::new(env("CS_ISSUER")?, env("CS_AUDIENCE")?, env("CS_JWKS_URI")?)
    })?;
    let app = Router::new()
        .route(
            "/shop",
            post(
                |Extension(approval): Extension<Approval>, body: String| async move {
                    format!(
                        "{} approved this purchase ({} bytes), approval {}",
                        approval.subject,
                        body.len(),
                        approval.approval_id
                    )
                },
            ),
        )
        // Outermost: the layer must see the request-target as received.
        .layer(VerifyLayer::new(verifier));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
