//! A raw MQTT 3.1.1 / 5 client for tests that must control every byte.
//!
//! Third-party clients (mosquitto_pub/sub, paho-mqtt) show that real tools
//! work; they cannot send the sequences that break brokers (the same invalid
//! client id twice, a v5 publish with properties aimed at a 3.1.1
//! subscriber, a packet over the size limit, half a packet) nor report the
//! exact return codes a broker answered with. This one can: it encodes
//! packets by hand, straight from the two specifications, and hands back
//! what came in as header byte plus body.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// MQTT protocol level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (level 4).
    V4,
    /// MQTT 5 (level 5).
    V5,
}

/// A will message.
#[derive(Clone, Debug)]
pub struct Will {
    /// Topic the broker publishes it to.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// QoS 0..2.
    pub qos: u8,
    /// Retained or not.
    pub retain: bool,
    /// Raw v5 will properties (without their length; ignored for 3.1.1).
    pub properties: Vec<u8>,
}

/// Everything a CONNECT can say.
#[derive(Clone, Debug)]
pub struct Connect {
    /// Protocol level.
    pub version: Version,
    /// Client identifier (may be empty or invalid on purpose).
    pub client_id: String,
    /// Username, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Vec<u8>>,
    /// Clean session / clean start.
    pub clean: bool,
    /// Keep-alive in seconds (0 = none).
    pub keep_alive: u16,
    /// Last will.
    pub will: Option<Will>,
    /// Raw v5 CONNECT properties (without their length).
    pub properties: Vec<u8>,
}

impl Connect {
    /// A clean-session CONNECT with credentials and a 30 s keep-alive.
    #[must_use]
    pub fn new(version: Version, client_id: &str, username: &str, password: &str) -> Connect {
        Connect {
            version,
            client_id: client_id.to_owned(),
            username: Some(username.to_owned()),
            password: Some(password.as_bytes().to_vec()),
            clean: true,
            keep_alive: 30,
            will: None,
            properties: Vec::new(),
        }
    }

    /// The packet's bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(if self.version == Version::V5 { 5 } else { 4 });
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3) | if w.retain { 0x20 } else { 0 };
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if self.version == Version::V5 {
            put_varint(&mut body, self.properties.len());
            body.extend_from_slice(&self.properties);
        }
        put_str(&mut body, self.client_id.as_bytes());
        if let Some(w) = &self.will {
            if self.version == Version::V5 {
                put_varint(&mut body, w.properties.len());
                body.extend_from_slice(&w.properties);
            }
            put_str(&mut body, w.topic.as_bytes());
            put_str(&mut body, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(&mut body, u.as_bytes());
        }
        if let Some(p) = &self.password {
            put_str(&mut body, p);
        }
        frame(0x10, &body)
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
}

/// Appends an MQTT variable byte integer.
pub fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// A fixed header plus `body`.
#[must_use]
pub fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A PUBLISH. `properties` are raw v5 properties (ignored for 3.1.1).
#[must_use]
pub fn publish(
    version: Version,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
    properties: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == Version::V5 {
        put_varint(&mut body, properties.len());
        body.extend_from_slice(properties);
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1) | u8::from(retain), &body)
}

/// A SUBSCRIBE of `filters` (filter, QoS).
#[must_use]
pub fn subscribe(version: Version, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0);
    }
    for (f, qos) in filters {
        put_str(&mut body, f.as_bytes());
        body.push(*qos);
    }
    frame(0x82, &body)
}

/// A v5 user property (`0x26`), for PUBLISH or CONNECT properties.
#[must_use]
pub fn user_property(key: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x26];
    put_str(&mut out, key.as_bytes());
    put_str(&mut out, value.as_bytes());
    out
}

/// One packet as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// First byte: type and flags.
    pub header: u8,
    /// Everything after the remaining length.
    pub body: Vec<u8>,
}

impl Packet {
    /// Packet type (high nibble).
    #[must_use]
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
}

/// A PUBLISH as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS it was delivered at.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Raw v5 properties (empty for 3.1.1).
    pub properties: Vec<u8>,
}

/// Why no packet came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// The broker closed the connection.
    Closed,
    /// Nothing within the timeout.
    Timeout,
    /// Bytes that are not MQTT.
    Malformed(String),
}

/// A raw connection to a broker.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The protocol level this connection speaks.
    pub version: Version,
    next_pkid: u16,
    /// PUBLISH packets that arrived while waiting for something else.
    pub queued: Vec<Message>,
}

impl Conn {
    /// Opens a TCP connection to `127.0.0.1:port` without saying anything.
    ///
    /// # Errors
    /// When the connection is refused or takes over 5 s.
    pub async fn open(port: u16, version: Version) -> Result<Conn, String> {
        Conn::open_from(port, Ipv4Addr::LOCALHOST, version).await
    }

    /// Like [`Conn::open`], from the loopback alias `source` (any
    /// 127.x.y.z on Linux): how the tests play many source addresses.
    ///
    /// # Errors
    /// When the address cannot be bound, or as [`Conn::open`].
    pub async fn open_from(port: u16, source: Ipv4Addr, version: Version) -> Result<Conn, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket.bind((source, 0).into()).map_err(|e| format!("bind {source}: {e}"))?;
        let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(([127, 0, 0, 1], port).into()))
            .await
            .map_err(|_| format!("connect to 127.0.0.1:{port} timed out"))?
            .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: Vec::new(), version, next_pkid: 1, queued: Vec::new() })
    }

    /// Sends CONNECT and returns the connection and the CONNACK return or
    /// reason code; `Err` when the broker closed without a CONNACK.
    ///
    /// # Errors
    /// When the socket fails or no CONNACK arrives within 10 s.
    pub async fn connect(port: u16, connect: &Connect) -> Result<(Conn, u8), RecvError> {
        Conn::connect_from(port, Ipv4Addr::LOCALHOST, connect).await
    }

    /// [`Conn::connect`] from the loopback alias `source`.
    ///
    /// # Errors
    /// As [`Conn::connect`].
    pub async fn connect_from(port: u16, source: Ipv4Addr, connect: &Connect) -> Result<(Conn, u8), RecvError> {
        let mut conn = Conn::open_from(port, source, connect.version).await.map_err(RecvError::Malformed)?;
        conn.send(&connect.encode()).await.map_err(|_| RecvError::Closed)?;
        let p = conn.recv(Duration::from_secs(10)).await?;
        if p.kind() != 2 {
            return Err(RecvError::Malformed(format!("expected CONNACK, got {p:?}")));
        }
        let code = *p.body.get(1).ok_or_else(|| RecvError::Malformed("short CONNACK".into()))?;
        Ok((conn, code))
    }

    /// Connects and insists on success.
    ///
    /// # Panics
    /// When the broker refuses or does not answer.
    pub async fn connected(port: u16, connect: &Connect) -> Conn {
        match Conn::connect(port, connect).await {
            Ok((conn, 0)) => conn,
            Ok((_, code)) => panic!("{} refused with code {code:#04x}", connect.client_id),
            Err(e) => panic!("{} got no CONNACK: {e:?}", connect.client_id),
        }
    }

    /// Writes raw bytes.
    ///
    /// # Errors
    /// When the socket is closed.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next packet, whatever it is.
    ///
    /// # Errors
    /// Closed, timeout or malformed.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Packet, RecvError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.cut()? {
                return Ok(p);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RecvError::Timeout),
                Ok(Ok(0) | Err(_)) => return Err(RecvError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
        }
    }

    fn cut(&mut self) -> Result<Option<Packet>, RecvError> {
        let Some(&header) = self.buf.first() else { return Ok(None) };
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let Some(&b) = self.buf.get(i) else { return Ok(None) };
            len |= usize::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 4 {
                return Err(RecvError::Malformed("remaining length".into()));
            }
        }
        if self.buf.len() < i + len {
            return Ok(None);
        }
        let body = self.buf.get(i..i + len).unwrap_or_default().to_vec();
        self.buf.drain(..i + len);
        Ok(Some(Packet { header, body }))
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        id
    }

    /// Subscribes and returns the SUBACK codes, keeping any PUBLISH that
    /// arrives first in [`Conn::queued`].
    ///
    /// # Errors
    /// When no SUBACK comes.
    pub async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Result<Vec<u8>, RecvError> {
        let pkid = self.pkid();
        self.send(&subscribe(self.version, pkid, filters)).await.map_err(|_| RecvError::Closed)?;
        loop {
            let p = self.recv(Duration::from_secs(10)).await?;
            match p.kind() {
                9 => {
                    let skip = if self.version == Version::V5 { 3 } else { 2 };
                    return Ok(p.body.get(skip..).unwrap_or_default().to_vec());
                }
                3 => {
                    let m = self.parse_publish(&p).await?;
                    self.queued.push(m);
                }
                _ => {}
            }
        }
    }

    /// Publishes; for QoS 1 waits for the PUBACK and returns its reason code
    /// (always 0 for 3.1.1, which has none).
    ///
    /// # Errors
    /// When the PUBACK does not come.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Result<u8, RecvError> {
        self.publish_with(topic, payload, qos, retain, &[]).await
    }

    /// [`Conn::publish`] with raw v5 properties.
    ///
    /// # Errors
    /// When the PUBACK does not come.
    pub async fn publish_with(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        properties: &[u8],
    ) -> Result<u8, RecvError> {
        let pkid = if qos > 0 { self.pkid() } else { 0 };
        self.send(&publish(self.version, topic, payload, qos, pkid, retain, properties))
            .await
            .map_err(|_| RecvError::Closed)?;
        if qos == 0 {
            return Ok(0);
        }
        loop {
            let p = self.recv(Duration::from_secs(10)).await?;
            match p.kind() {
                4 if p.body.get(..2) == Some(&pkid.to_be_bytes()) => return Ok(p.body.get(2).copied().unwrap_or(0)),
                3 => {
                    let m = self.parse_publish(&p).await?;
                    self.queued.push(m);
                }
                _ => {}
            }
        }
    }

    /// The next PUBLISH within `timeout` (acknowledging QoS 1 ones).
    ///
    /// # Errors
    /// Timeout, closed or malformed.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Message, RecvError> {
        if !self.queued.is_empty() {
            return Ok(self.queued.remove(0));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.recv(left).await?;
            if p.kind() == 3 {
                return self.parse_publish(&p).await;
            }
        }
    }

    async fn parse_publish(&mut self, p: &Packet) -> Result<Message, RecvError> {
        let bad = || RecvError::Malformed(format!("bad PUBLISH {p:?}"));
        let qos = (p.header >> 1) & 3;
        let body = &p.body;
        let tlen = usize::from(u16::from_be_bytes([*body.first().ok_or_else(bad)?, *body.get(1).ok_or_else(bad)?]));
        let topic = String::from_utf8(body.get(2..2 + tlen).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
        let mut at = 2 + tlen;
        let mut pkid = None;
        if qos > 0 {
            pkid = Some([*body.get(at).ok_or_else(bad)?, *body.get(at + 1).ok_or_else(bad)?]);
            at += 2;
        }
        let mut properties = Vec::new();
        if self.version == Version::V5 {
            let (plen, used) = read_varint(body.get(at..).ok_or_else(bad)?).ok_or_else(bad)?;
            at += used;
            properties = body.get(at..at + plen).ok_or_else(bad)?.to_vec();
            at += plen;
        }
        let payload = body.get(at..).ok_or_else(bad)?.to_vec();
        if let Some(id) = pkid {
            let ack = frame(if qos == 1 { 0x40 } else { 0x50 }, &id);
            let _ = self.stream.write_all(&ack).await;
        }
        Ok(Message { topic, payload, qos, retain: p.header & 1 == 1, properties })
    }

    /// Sends DISCONNECT and closes.
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xe0, 0]).await;
        let _ = self.stream.shutdown().await;
    }

    /// Waits for the broker to close the connection; returns the v5
    /// DISCONNECT reason it sent first, if any.
    ///
    /// # Errors
    /// Timeout when the connection stays open.
    pub async fn closed(&mut self, timeout: Duration) -> Result<Option<u8>, RecvError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reason = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv(left).await {
                Ok(p) if p.kind() == 14 => reason = Some(p.body.first().copied().unwrap_or(0)),
                Ok(_) => {}
                Err(RecvError::Closed) => return Ok(reason),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads a variable byte integer; returns (value, bytes used).
#[must_use]
pub fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}
