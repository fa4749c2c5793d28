//! HTTP/2 rules of the front door with a raw HTTP/2 client (the `h2`
//! crate over rustls), sending what ordinary clients never do: a `host`
//! that disagrees with `:authority`, a cookie split over several fields,
//! a `content-length` the DATA frames do not match, `CONNECT`. None of it
//! may reach the API unapproved (RFC 9113 §8.2-8.3, the book's security
//! chapter, docs/security.md).

mod support;

use bytes::Bytes;
use http::{Method, Request};
use support::front::{h2_send as send, Tls};
use support::*;

/// A gateway serving `shop.test` over TLS (h2 by ALPN), its certificate, the world.
async fn world() -> (Tls, World) {
    let tls = Tls::new();
    let world = World::builder()
        .listen_tls(Some(tls.listen.clone()))
        .start()
        .await;
    (tls, world)
}

/// An HTTP/2 connection to the gateway, `shop.test` by SNI.
async fn connect(tls: &Tls, world: &World) -> h2::client::SendRequest<Bytes> {
    tls.connect(world.gateway.proxy).await
}

fn request(method: Method, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("https://shop.test{path}"))
        .header(USER_HEADER, "alice")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_header_that_disagrees_with_the_authority_is_refused() {
    let (tls, world) = world().await;
    let mut client = connect(&tls, &world).await;
    let agreed = request(Method::GET, "/products").body(()).unwrap();
    assert_eq!(send(&mut client, agreed, b"").await.unwrap().0, 200);
    let forged = request(Method::GET, "/products")
        .header("host", "admin.internal")
        .body(())
        .unwrap();
    // pingora refuses it while reading the request (RFC 9113 §8.3.1), a
    // plain 400 before the gateway's own checks could give a problem.
    let (status, body) = send(&mut client, forged, b"").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(world.shop.received().len(), 1, "only the agreeing call");
}

#[tokio::test(flavor = "multi_thread")]
async fn cookies_split_over_several_fields_are_read_together() {
    let (tls, world) = world().await;
    let mut client = connect(&tls, &world).await;
    // RFC 9113 §8.2.3: a client may split the cookie into several fields.
    // The one after the first names `qty`, which PHP's $_REQUEST lets win
    // over the body the person is shown.
    let split = request(Method::POST, "/shop")
        .header("content-type", "application/json")
        .header("cookie", "session=abc")
        .header("cookie", "qty=100")
        .body(())
        .unwrap();
    let body = serde_json::to_vec(&phones()).unwrap();
    let (status, problem) = send(&mut client, split, &body).await.unwrap();
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "ambiguous_parameter", "{problem}");
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
    assert!(world.shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_content_length_the_data_frames_do_not_match_never_reaches_the_api() {
    let (tls, world) = world().await;
    let mut client = connect(&tls, &world).await;
    let body = serde_json::to_vec(&phones()).unwrap();
    // Declares more than it sends, on a policy route and on a passing one.
    for path in ["/shop", "/gift-cards/unknown"] {
        let lying = request(Method::POST, path)
            .header("content-type", "application/json")
            .header("content-length", (body.len() + 50).to_string())
            .body(())
            .unwrap();
        let answer = send(&mut client, lying, &body).await;
        assert!(
            answer.as_ref().map_or(true, |(status, _)| *status >= 400),
            "{path}: {answer:?}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(world.peer.requests().await.is_empty(), "nobody was asked");
    assert!(
        world.shop.received().is_empty(),
        "{:?}",
        world.shop.received()
    );
}

/// An HTTP/2 connection without TLS (prior knowledge) to `addr`.
async fn connect_h2c(
    addr: std::net::SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_only_when_configured_and_with_the_same_gate() {
    let world = World::start(GatewayOptions {
        h2c: true,
        ..GatewayOptions::default()
    })
    .await;
    let mut client = connect_h2c(world.gateway.proxy).await.unwrap();
    let plain = |path: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://shop.test{path}"))
            .header(USER_HEADER, "alice")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    let body = serde_json::to_vec(&phones()).unwrap();
    let (status, problem) = send(&mut client, plain("/%EF%BD%93hop"), &body)
        .await
        .unwrap();
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "invalid_path", "{problem}");
    let list = Request::builder()
        .uri("http://shop.test/products")
        .body(())
        .unwrap();
    assert_eq!(send(&mut client, list, b"").await.unwrap().0, 200);
    // HTTP/1.1 still works on the same listener.
    let http1 = reqwest::get(world.gateway.url("/products")).await.unwrap();
    assert_eq!(http1.status(), 200);
    assert_eq!(world.shop.received().len(), 2);

    // Not configured: a prior-knowledge HTTP/2 client gets nowhere.
    let plain_world = World::start(GatewayOptions::default()).await;
    let refused = match connect_h2c(plain_world.gateway.proxy).await {
        Err(_) => true,
        Ok(mut client) => {
            let list = Request::builder()
                .uri("http://shop.test/products")
                .body(())
                .unwrap();
            send(&mut client, list, b"").await.is_err()
        }
    };
    assert!(refused, "h2c was served without being configured");
    assert!(plain_world.shop.received().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_refused_like_an_upgrade() {
    let (tls, world) = world().await;
    let mut client = connect(&tls, &world).await;
    let tunnel = Request::builder()
        .method(Method::CONNECT)
        .uri("shop.test:443")
        .header(USER_HEADER, "alice")
        .body(())
        .unwrap();
    let answer = send(&mut client, tunnel, b"").await;
    assert!(
        answer.as_ref().map_or(true, |(status, _)| *status >= 400),
        "{answer:?}"
    );
    assert!(world.shop.received().is_empty());
}
