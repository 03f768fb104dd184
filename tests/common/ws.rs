//! A client of Switchboard's WebSocket (protocol v1) for tests: connect, send frames, read frames
//! with a deadline, and see how the server closed the socket.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for one frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

pub struct Socket {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a socket ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The connection ended without a close frame.
    Dropped,
}

pub fn url(client: SocketAddr) -> String {
    format!("ws://{client}/_switchboard/client/v1/connect")
}

impl Socket {
    /// Connects with `Authorization: Bearer <token>`; `Err` carries the HTTP status and JSON body
    /// of a refused upgrade.
    pub async fn connect(client: SocketAddr, token: Option<&str>) -> Result<Socket, (u16, Value)> {
        let mut request = url(client).into_client_request().unwrap();
        if let Some(token) = token {
            request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(Socket { stream }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().and_then(|b| serde_json::from_slice(b).ok());
                Err((status, body.unwrap_or(Value::Null)))
            }
            Err(error) => panic!("connect: {error}"),
        }
    }

    /// Connects with a token and returns the socket with its `ready` frame.
    pub async fn ready(client: SocketAddr, token: &str) -> (Socket, Value) {
        let mut socket = Socket::connect(client, Some(token)).await.expect("upgrade accepted");
        let ready = socket.next_of("ready").await;
        (socket, ready)
    }

    pub async fn send(&mut self, frame: &Value) {
        self.stream.send(Message::Text(frame.to_string().into())).await.expect("send a frame");
    }

    pub async fn send_text(&mut self, text: String) {
        self.stream.send(Message::Text(text.into())).await.expect("send a frame");
    }

    /// The next JSON frame (pings are answered by the library), or how the socket ended.
    pub async fn next(&mut self) -> Result<Value, Ended> {
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .expect("a frame within FRAME_WAIT");
            match message {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).expect("JSON frame")),
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame.map_or(Ended::Dropped, |frame| Ended::Closed(frame.code.into())));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(Ended::Dropped),
            }
        }
    }

    /// The next JSON frame if one comes within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Result<Value, Ended>> {
        loop {
            let message = tokio::time::timeout(within, self.stream.next()).await.ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(Ok(serde_json::from_str(&text).expect("JSON frame")));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Err(frame.map_or(Ended::Dropped, |frame| Ended::Closed(frame.code.into()))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Some(Err(Ended::Dropped)),
            }
        }
    }

    /// The next frame of `kind`, skipping others (presence, say).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        for _ in 0..100 {
            let frame = self.next().await.unwrap_or_else(|ended| panic!("waiting for {kind}: {ended:?}"));
            if frame["type"] == kind {
                return frame;
            }
        }
        panic!("no {kind} frame among 100");
    }

    /// Reads until the socket ends; the frames seen on the way and how it ended.
    pub async fn until_closed(&mut self) -> (Vec<Value>, Ended) {
        let mut frames = Vec::new();
        for _ in 0..10_000 {
            match self.next().await {
                Ok(frame) => frames.push(frame),
                Err(ended) => return (frames, ended),
            }
        }
        panic!("the socket did not close within 10,000 frames");
    }
}

/// Watches `addresses` and waits until each has a `presence` frame showing a verified user (the
/// directory has looked its profile up); other frames on the way are skipped.
pub async fn watch_verified(socket: &mut Socket, addresses: &[&str]) {
    socket.send(&serde_json::json!({ "type": "watch", "addresses": addresses })).await;
    let mut verified = std::collections::HashSet::new();
    for _ in 0..200 {
        let frame = socket.next_of("presence").await;
        if frame["users"][0]["verified"] == true {
            verified.insert(frame["address"].as_str().unwrap().to_owned());
        }
        if addresses.iter().all(|address| verified.contains(*address)) {
            return;
        }
    }
    panic!("not every address showed a verified user: {verified:?}");
}
