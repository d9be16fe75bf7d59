//! MQTT over WebSockets, for browsers and tools that only speak it.
//!
//! The WebSocket handshake happens inside the connection's own task, under
//! the same connect deadline as a TLS handshake (rumqttd's websocket
//! listener handshakes inline and one idle socket stalls it). After that,
//! [`WsBytes`] turns the message stream back into the byte stream the
//! session reads: MQTT over WebSockets carries MQTT packets in binary
//! messages, and a packet may span messages or share one, so the session
//! frames the bytes exactly as it does for TCP.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Performs the server side of the WebSocket handshake on `stream`.
///
/// Clients ask for the `mqtt` subprotocol (MQTT 3.1.1 and 5; some older
/// ones say `mqttv3.1`); the answer names the one chosen, as the MQTT spec
/// requires. A client that names none is still served: several embedded
/// stacks omit the header.
pub async fn accept<S>(stream: S) -> Result<WsBytes<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = tokio_tungstenite::accept_hdr_async(stream, choose_subprotocol).await?;
    Ok(WsBytes { ws, pending: Bytes::new(), eof: false })
}

/// The handshake callback. Its signature is tungstenite's (an HTTP
/// response as the error type), hence the lint exception.
#[allow(clippy::result_large_err)]
fn choose_subprotocol(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let offered = request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .find(|p| p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"))
        .map(str::to_owned);
    if let Some(protocol) = offered
        && let Ok(value) = HeaderValue::from_str(&protocol)
    {
        response.headers_mut().insert("Sec-WebSocket-Protocol", value);
    }
    Ok(response)
}

/// A WebSocket connection seen as a byte stream: binary messages in, one
/// binary message per write out.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    eof: bool,
}

fn other(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(this.pending.get(..n).unwrap_or_default());
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.pending = bytes,
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT over WebSockets is binary",
                    )));
                }
                // Pings are answered by tungstenite on the next flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(other)?;
        Pin::new(&mut this.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(other)
    }
}
