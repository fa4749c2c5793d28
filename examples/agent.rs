//! An example agent's shop tool: it buys through the Countersign gateway and
//! relays the answer, exactly as an LLM tool would hand it back to the model.
//!
//! The agent holds no shop credential. It names the user it acts for; the
//! gateway holds the call until that user approves on their phone (in dev
//! mode: the approver page), then forwards it with a fresh access token. On
//! policies with `wait: async` (or a hold limit) the gateway answers `202`
//! instead; the tool then calls again after `Retry-After`, as every agent
//! should.
//!
//! ```sh
//! cargo run -- dev       # in another terminal
//! cargo run --example agent -- --product "XYZ phone" --qty 2 --price-limit 900 --user alice
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Buy through the Countersign gateway, as an agent's shop tool would")]
struct Args {
    /// The gateway in front of the shop.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    #[arg(long)]
    product: String,
    #[arg(long, default_value_t = 1)]
    qty: u32,
    /// The most the user will pay.
    #[arg(long)]
    price_limit: u32,
    /// The user the agent acts for; they approve the purchase.
    #[arg(long, default_value = "alice")]
    user: String,
    /// How long to wait for the user's answer, in seconds (the gateway
    /// answers on its own when the approval expires).
    #[arg(long, default_value_t = 330)]
    timeout: u64,
}

/// What the tool returns to the model: the order, or why there is none.
enum ToolResult {
    Ordered(Value),
    Refused { code: String, detail: String },
}

async fn buy(args: &Args) -> Result<ToolResult, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{}/shop", args.gateway.trim_end_matches('/'));
    let order = json!({ "product": args.product, "qty": args.qty, "priceLimit": args.price_limit });
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout);
    // The retry contract: a 202 means "still waiting for the person"; the
    // same call again after Retry-After attaches to that approval (the
    // person is not asked twice) and, once they answered, gets the answer.
    let response = loop {
        let response = http
            .post(&url)
            .header("x-countersign-user", &args.user)
            .json(&order)
            .send()
            .await
            .map_err(|e| format!("cannot reach the gateway at {url}: {e}"))?;
        if response.status() != reqwest::StatusCode::ACCEPTED {
            break response;
        }
        let wait = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(5);
        let pending: Value = response.json().await.unwrap_or_default();
        eprintln!(
            "agent: {}",
            pending["detail"].as_str().unwrap_or("waiting for approval")
        );
        if std::time::Instant::now() + Duration::from_secs(wait) > deadline {
            return Ok(ToolResult::Refused {
                code: "still_pending".to_owned(),
                detail: "The user has not answered yet; ask again later.".to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_secs(wait)).await;
    };
    let status = response.status();
    let problem = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let body: Value = response
        .json()
        .await
        .map_err(|e| format!("HTTP {status} with a body that is not JSON: {e}"))?;
    if status.is_success() {
        return Ok(ToolResult::Ordered(body));
    }
    // Countersign's problem documents carry a sentence meant to be relayed.
    let (code, detail) = if problem {
        (
            body["code"].as_str().unwrap_or("unknown").to_owned(),
            body["detail"].as_str().unwrap_or_default().to_owned(),
        )
    } else {
        (
            format!("http_{}", status.as_u16()),
            body["error"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned),
        )
    };
    Ok(ToolResult::Refused { code, detail })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "agent: buying {} x {} for {} (limit {}); waiting for {}'s approval...",
        args.qty, args.product, args.user, args.price_limit, args.user
    );
    match buy(&args).await {
        Ok(ToolResult::Ordered(order)) => {
            println!(
                "Order {} confirmed: {} x {} for {}.",
                order["order_id"].as_str().unwrap_or("?"),
                order["qty"],
                order["product"].as_str().unwrap_or("?"),
                order["buyer"].as_str().unwrap_or("?"),
            );
            ExitCode::SUCCESS
        }
        Ok(ToolResult::Refused { code, detail }) => {
            println!("No order was placed ({code}): {detail}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("agent: {error}");
            ExitCode::FAILURE
        }
    }
}
