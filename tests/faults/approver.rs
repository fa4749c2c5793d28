//! The people: polls the authorization server's pending CIBA requests,
//! whoever they are for (the person a call is made for, or one of its
//! countersigners), and approves or denies each after a while, or never
//! answers (it expires). The choice is drawn from the run's seed, the
//! request's binding message and who it asks, so a replay decides the same
//! call the same way, and two countersigners of one call independently.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::now_ms;

/// A decision the approver sent to the authorization server.
#[derive(Debug, Clone)]
pub struct Decision {
    pub auth_req_id: String,
    pub binding_message: String,
    pub sub: String,
    pub approve: bool,
    /// When it was first sent (unix ms): it took effect no earlier. Whether
    /// it took effect is the authorization server's record of the request
    /// (an answer lost to a pause may hide that it did).
    pub at_ms: i64,
}

/// One bc-authorize request as the authorization server recorded it.
#[derive(Debug, Clone)]
pub struct Push {
    pub auth_req_id: String,
    pub sub: String,
    pub binding_message: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub status: String,
    pub polls: u64,
    pub slow_downs: u64,
}

impl Push {
    pub fn from_json(v: &Value) -> Self {
        Self {
            auth_req_id: v["auth_req_id"].as_str().unwrap_or_default().to_owned(),
            sub: v["sub"].as_str().unwrap_or_default().to_owned(),
            binding_message: v["binding_message"].as_str().unwrap_or_default().to_owned(),
            created_at_ms: v["created_at_ms"].as_i64().unwrap_or_default(),
            expires_at_ms: v["expires_at_ms"].as_i64().unwrap_or_default(),
            status: v["status"].as_str().unwrap_or_default().to_owned(),
            polls: v["polls"].as_u64().unwrap_or_default(),
            slow_downs: v["slow_downs"].as_u64().unwrap_or_default(),
        }
    }
}

pub struct Approver {
    pub issuer: String,
    pub seed: u64,
    pub decisions: Mutex<Vec<Decision>>,
    http: reqwest::Client,
}

impl Approver {
    pub fn new(issuer: String, seed: u64) -> Self {
        Self {
            issuer,
            seed,
            decisions: Mutex::new(Vec::new()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
        }
    }

    /// Every bc-authorize the authorization server received.
    pub async fn pushes(&self) -> Result<Vec<Push>, reqwest::Error> {
        let all: Vec<Value> = self
            .http
            .get(format!("{}/control/requests", self.issuer))
            .send()
            .await?
            .json()
            .await?;
        Ok(all.iter().map(Push::from_json).collect())
    }

    /// Watches for pending requests until `stop` says so.
    pub async fn run(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let mut seen = HashSet::new();
        let mut asked: HashMap<String, u32> = HashMap::new();
        while !*stop.borrow() {
            let pending: Vec<Value> = match self
                .http
                .get(format!("{}/control/requests?status=pending", self.issuer))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or_default(),
                // Paused or restarting: look again.
                Err(_) => Vec::new(),
            };
            for request in pending {
                let push = Push::from_json(&request);
                if !seen.insert(push.auth_req_id.clone()) {
                    continue;
                }
                // The same call asked twice is decided independently.
                let asks = format!("{}#{}", push.binding_message, push.sub);
                let nth = asked.entry(asks.clone()).or_default();
                *nth += 1;
                let mut rng = StdRng::seed_from_u64(super::schedule::sub_seed(
                    self.seed,
                    &format!("{asks}#{nth}"),
                ));
                let roll = rng.random_range(0..100);
                let delay = Duration::from_millis(rng.random_range(200..6000));
                // Countersigners approve more often than people do (70:15,
                // not 55:25), so that a fair share of countersigned calls
                // is forwarded: each needs three yeses.
                let (yes, no) = if push.binding_message.starts_with("Countersign:") {
                    (70, 85)
                } else {
                    (55, 80)
                };
                let approve = match roll {
                    r if r < yes => true,
                    r if r < no => false,
                    // Never answered: it expires.
                    _ => continue,
                };
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    me.decide(push, approve).await;
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn decide(&self, push: Push, approve: bool) {
        let action = if approve { "approve" } else { "deny" };
        let url = format!(
            "{}/control/requests/{}/{action}",
            self.issuer, push.auth_req_id
        );
        let at_ms = now_ms();
        // The authorization server may be paused: try a few times (a 409
        // after a lost answer is the first attempt having worked).
        for _ in 0..5 {
            let sent = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await;
            if sent.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.decisions.lock().unwrap().push(Decision {
            auth_req_id: push.auth_req_id,
            binding_message: push.binding_message,
            sub: push.sub,
            approve,
            at_ms,
        });
    }
}
