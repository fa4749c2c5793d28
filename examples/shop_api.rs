//! The example shop API, standalone: put Countersign in front of it.
//!
//! ```sh
//! cargo run --example shop_api -- --issuer http://127.0.0.1:4000 --port 3000
//! ```
//!
//! `POST /shop` needs an access token from `--issuer` for audience
//! `https://shop.example/api` with scope `product:buy`; `GET /products` is open.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The authorization server whose tokens the shop accepts.
    #[arg(long)]
    issuer: String,
    /// Its JWKS; defaults to the `jwks_uri` from its discovery document.
    #[arg(long)]
    jwks_uri: Option<url::Url>,
    #[arg(long, default_value_t = 3000)]
    port: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let jwks_uri = match args.jwks_uri {
        Some(uri) => uri,
        None => {
            let discovery: serde_json::Value = reqwest::get(format!(
                "{}/.well-known/openid-configuration",
                args.issuer.trim_end_matches('/')
            ))
            .await?
            .json()
            .await?;
            discovery["jwks_uri"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("the issuer advertises no jwks_uri"))?
                .parse()?
        }
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let shop = countersign::demo::shop::serve(listener, &args.issuer, jwks_uri).await?;
    println!(
        "shop API listening on http://{} (tokens from {})",
        shop.addr, args.issuer
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
