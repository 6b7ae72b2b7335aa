//! XMPP over WebSocket (RFC 7395) as a second driver, so the same scenarios load ejabberd.
//!
//! A session opens the stream, authenticates with SASL PLAIN, binds a resource, enables
//! stream management (XEP-0198) and sends initial presence, the point at which an XMPP server
//! replays what was kept for an offline user. The contract's frames map onto it like this:
//!
//! | the chat's             | XMPP's                                                         |
//! |------------------------|----------------------------------------------------------------|
//! | `send`                 | `<message type='chat'>`, then `<r/>` (an ack request)           |
//! | `sent`                 | `<a h='n'/>`: the server has handled the first n stanzas        |
//! | `message`              | an incoming `<message>` with a `<body>`                         |
//! | `ack` (receiver)       | `<a h='n'/>`, the answer to the server's `<r/>`: the client has |
//! |                        | the first n stanzas (sent by the reading half, as it arrives)   |
//! | `backlog_done`         | the answer to a ping sent right after presence (XMPP has no    |
//! |                        | end-of-replay marker; the replay may still be arriving)         |
//!
//! One WebSocket frame carries one element (RFC 7395 §3.3.3), so a frame is parsed alone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use quick_xml::escape::{escape, resolve_predefined_entity};
use quick_xml::events::{BytesStart, Event as Xml};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::chat::{Event, Peer, Ws};

/// The one virtual host the benchmark's ejabberd serves (bench/ejabberd/ejabberd.yml.in).
pub const DOMAIN: &str = "localhost";
/// The WebSocket subprotocol RFC 7395 registers.
pub const SUBPROTOCOL: &str = "xmpp";

const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
const SM: &str = "urn:xmpp:sm:3";
/// The id of the ping that marks the end of a session's start.
const STARTED: &str = "started";

/// One element the server sent, as far as the tool cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Open,
    Close,
    Features {
        plain: bool,
        bind: bool,
        sm: bool,
    },
    Success,
    Failure(String),
    Enabled,
    /// `<r/>`: the server asks which stanzas arrived.
    AckRequest,
    /// `<a h/>`: the server has handled this many of the session's stanzas.
    Ack(u32),
    Message {
        from: String,
        id: Option<String>,
        /// The archive's id for the message (`<stanza-id>`, XEP-0359), when it has one.
        stanza_id: Option<String>,
        body: Option<String>,
    },
    Iq {
        id: String,
        kind: String,
    },
    Presence,
    /// `<stream:error>`: the server is ending the stream.
    StreamError(String),
    Other(String),
}

impl Frame {
    /// Whether XEP-0198 counts it (it counts stanzas only).
    fn is_stanza(&self) -> bool {
        matches!(
            self,
            Frame::Message { .. } | Frame::Iq { .. } | Frame::Presence
        )
    }
}

fn attr(element: &BytesStart<'_>, name: &str) -> Option<String> {
    element
        .attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == name.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

fn local(element: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(element.local_name().as_ref()).into_owned()
}

/// Parses one frame's element.
pub fn parse(text: &str) -> Result<Frame> {
    let mut reader = quick_xml::Reader::from_str(text);
    let (root, empty) = loop {
        match reader.read_event()? {
            Xml::Start(e) => break (e.into_owned(), false),
            Xml::Empty(e) => break (e.into_owned(), true),
            Xml::Eof => bail!("a frame without an element: {text:?}"),
            _ => {}
        }
    };
    let name = local(&root);
    let frame = match name.as_str() {
        "open" => Frame::Open,
        "close" => Frame::Close,
        "success" => Frame::Success,
        "enabled" => Frame::Enabled,
        "r" => Frame::AckRequest,
        "a" => Frame::Ack(
            attr(&root, "h")
                .and_then(|h| h.parse().ok())
                .with_context(|| format!("an ack without a count: {text:?}"))?,
        ),
        "presence" => Frame::Presence,
        "iq" => Frame::Iq {
            id: attr(&root, "id").unwrap_or_default(),
            kind: attr(&root, "type").unwrap_or_default(),
        },
        "message" => {
            let mut stanza_id = None;
            let mut body = None;
            if !empty {
                walk(&mut reader, |child, text| match child {
                    "stanza-id" if stanza_id.is_none() => stanza_id = text.attr("id"),
                    "body" => body = Some(text.content()),
                    _ => {}
                })?;
            }
            Frame::Message {
                from: attr(&root, "from").unwrap_or_default(),
                id: attr(&root, "id"),
                stanza_id,
                body,
            }
        }
        "features" => {
            let (mut plain, mut bind, mut sm) = (false, false, false);
            if !empty {
                walk(&mut reader, |child, text| match child {
                    "mechanism" => plain |= text.content() == "PLAIN",
                    "bind" => bind = true,
                    "sm" => sm |= text.attr("xmlns").as_deref() == Some(SM),
                    _ => {}
                })?;
            }
            Frame::Features { plain, bind, sm }
        }
        "failure" | "error" => {
            let mut why = Vec::new();
            if !empty {
                walk(&mut reader, |child, _| why.push(child.to_owned()))?;
            }
            let why = why.join(" ");
            if name == "error" {
                Frame::StreamError(why)
            } else {
                Frame::Failure(why)
            }
        }
        _ => Frame::Other(name),
    };
    Ok(frame)
}

/// A child element met by [`walk`]: its attributes, and its text when asked for.
struct Child<'r, 'x> {
    element: BytesStart<'static>,
    reader: &'r mut quick_xml::Reader<&'x [u8]>,
    empty: bool,
}

impl Child<'_, '_> {
    fn attr(&self, name: &str) -> Option<String> {
        attr(&self.element, name)
    }

    /// The element's text, entities resolved (consumes it up to its end).
    fn content(self) -> String {
        let mut text = String::new();
        if self.empty {
            return text;
        }
        while let Ok(event) = self.reader.read_event() {
            match event {
                Xml::Text(t) => text.push_str(&t.decode().unwrap_or_default()),
                Xml::CData(t) => text.push_str(&t.decode().unwrap_or_default()),
                Xml::GeneralRef(r) => {
                    if let Ok(Some(c)) = r.resolve_char_ref() {
                        text.push(c);
                    } else if let Some(s) = r
                        .decode()
                        .ok()
                        .and_then(|name| resolve_predefined_entity(&name))
                    {
                        text.push_str(s);
                    }
                }
                Xml::End(_) | Xml::Eof => break,
                _ => {}
            }
        }
        text
    }
}

/// Calls `visit` with every element under the root (any depth), by local name.
fn walk(
    reader: &mut quick_xml::Reader<&[u8]>,
    mut visit: impl FnMut(&str, Child<'_, '_>),
) -> Result<()> {
    loop {
        let (element, empty) = match reader.read_event()? {
            Xml::Start(e) => (e.into_owned(), false),
            Xml::Empty(e) => (e.into_owned(), true),
            Xml::Eof => return Ok(()),
            _ => continue,
        };
        let name = local(&element);
        visit(
            &name,
            Child {
                element,
                reader,
                empty,
            },
        );
    }
}

/// Stanzas sent since stream management was enabled, and the messages among them that the
/// server has not acknowledged yet (by their number in the stream): the writing half adds,
/// the reading half removes when the server's `<a h/>` comes.
#[derive(Default)]
struct Outbox {
    sent: u32,
    unacked: VecDeque<(u32, String)>,
}

async fn send_text(ws: &mut Ws, text: String) -> Result<()> {
    ws.send(WsMessage::text(text)).await?;
    Ok(())
}

async fn expect(ws: &mut Ws, what: &str) -> Result<Frame> {
    while let Some(frame) = ws.next().await {
        if let WsMessage::Text(text) = frame? {
            let frame = parse(&text)?;
            if let Frame::StreamError(why) | Frame::Failure(why) = &frame {
                bail!("waiting for {what}, the server said: {why}");
            }
            return Ok(frame);
        }
    }
    Err(Closed(what.to_owned()).into())
}

fn open() -> String {
    format!("<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>")
}

/// The server closed a new WebSocket before it answered the stream's opening: nothing of the
/// session happened yet, so connecting again is safe. ejabberd 23.01 does this now and then
/// under load (it leaves the opening unanswered until its negotiation timeout, 30 s, closes
/// the socket: once in 5,000 connections in a benchmark run, once in a test run of 40).
#[derive(Debug, thiserror::Error)]
#[error("the server closed the stream before it opened")]
pub struct NotOpened;

/// The server closed the WebSocket while the tool waited for `.0`.
#[derive(Debug, thiserror::Error)]
#[error("the server closed the stream while the tool waited for {0}")]
struct Closed(String);

/// Runs a session's start on an open WebSocket: stream, SASL PLAIN as `user`, resource
/// bind, stream management, initial presence, and the ping whose answer ends the start
/// (read as `backlog_done`).
pub async fn start(
    mut ws: Ws,
    user: &str,
    password: &str,
    resource: &str,
) -> Result<(Writer, Reader)> {
    send_text(&mut ws, open()).await?;
    match expect(&mut ws, "the stream to open").await {
        Ok(_) => {}
        Err(e) if e.is::<Closed>() => return Err(NotOpened.into()),
        Err(e) => return Err(e),
    }
    match expect(&mut ws, "the stream's features").await? {
        Frame::Features { plain: true, .. } => {}
        other => bail!("the server does not offer SASL PLAIN: {other:?}"),
    }
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    send_text(
        &mut ws,
        format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{credentials}</auth>"
        ),
    )
    .await?;
    match expect(&mut ws, "authentication").await? {
        Frame::Success => {}
        other => bail!("{user} was not authenticated: {other:?}"),
    }
    send_text(&mut ws, open()).await?;
    expect(&mut ws, "the stream to reopen").await?;
    match expect(&mut ws, "the stream's features").await? {
        Frame::Features {
            bind: true,
            sm: true,
            ..
        } => {}
        other => bail!("the server offers no resource binding or stream management: {other:?}"),
    }
    send_text(
        &mut ws,
        format!(
            "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>{}</resource></bind></iq>",
            escape(resource)
        ),
    )
    .await?;
    match expect(&mut ws, "the resource to be bound").await? {
        Frame::Iq { id, kind } if id == "bind" && kind == "result" => {}
        other => bail!("binding a resource failed: {other:?}"),
    }
    send_text(&mut ws, format!("<enable xmlns='{SM}'/>")).await?;
    match expect(&mut ws, "stream management").await? {
        Frame::Enabled => {}
        other => bail!("stream management was not enabled: {other:?}"),
    }
    send_text(&mut ws, "<presence/>".to_owned()).await?;
    send_text(
        &mut ws,
        format!("<iq type='get' id='{STARTED}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"),
    )
    .await?;
    // The presence and the ping are the stream's first two stanzas.
    let outbox = Arc::new(Mutex::new(Outbox {
        sent: 2,
        unacked: VecDeque::new(),
    }));
    let (sink, stream) = ws.split();
    let sink = Arc::new(tokio::sync::Mutex::new(sink));
    Ok((
        Writer {
            sink: sink.clone(),
            outbox: outbox.clone(),
        },
        Reader {
            stream,
            sink,
            outbox,
            received: 0,
            pending: VecDeque::new(),
            messages: 0,
        },
    ))
}

type Sink = Arc<tokio::sync::Mutex<SplitSink<Ws, WsMessage>>>;

/// The sending half of a session.
pub struct Writer {
    sink: Sink,
    outbox: Arc<Mutex<Outbox>>,
}

impl Writer {
    /// A chat message to `to`'s bare JID, then a request for the server's ack of it.
    pub async fn send(&mut self, to: &str, client_id: &str, body: &str) -> Result<()> {
        let message = format!(
            "<message to='{}' type='chat' id='{}'><body>{}</body></message>",
            escape(to),
            escape(client_id),
            escape(body)
        );
        {
            let mut outbox = self.outbox.lock().expect("outbox lock");
            outbox.sent = outbox.sent.wrapping_add(1);
            let number = outbox.sent;
            outbox.unacked.push_back((number, client_id.to_owned()));
        }
        let mut sink = self.sink.lock().await;
        sink.feed(WsMessage::text(message)).await?;
        sink.send(WsMessage::text(format!("<r xmlns='{SM}'/>")))
            .await?;
        Ok(())
    }

    pub async fn close(self) {
        let mut sink = self.sink.lock().await;
        let _ = sink
            .send(WsMessage::text(format!("<close xmlns='{FRAMING}'/>")))
            .await;
        let _ = sink.close().await;
    }
}

/// The receiving half of a session. It answers the server's ack requests itself, as they
/// arrive (as XMPP clients do; a server closes a session that leaves them unanswered).
pub struct Reader {
    stream: SplitStream<Ws>,
    sink: Sink,
    outbox: Arc<Mutex<Outbox>>,
    /// Stanzas received since stream management was enabled (what the client acks).
    received: u32,
    /// Events one frame produced beyond the first (an ack covers many messages).
    pending: VecDeque<Event>,
    /// Messages received, for the count the end of the start reports.
    messages: u64,
}

impl Reader {
    /// The next event, in the chat's terms (`None` when the server ended the stream).
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            let Some(frame) = self.stream.next().await else {
                return Ok(None);
            };
            let text = match frame? {
                WsMessage::Text(text) => text,
                WsMessage::Close(_) => return Ok(None),
                _ => continue,
            };
            let frame = parse(&text)?;
            if frame.is_stanza() {
                self.received = self.received.wrapping_add(1);
            }
            match frame {
                Frame::Message {
                    from,
                    id,
                    stanza_id,
                    body: Some(body),
                } => {
                    self.messages += 1;
                    let bare = from.split('/').next().unwrap_or_default().to_owned();
                    return Ok(Some(Event::Message {
                        msg_id: stanza_id.or(id).unwrap_or_default(),
                        from: Peer::Jid(bare),
                        body,
                    }));
                }
                Frame::Iq { id, kind } if id == STARTED && kind == "result" => {
                    return Ok(Some(Event::BacklogDone {
                        count: self.messages,
                    }));
                }
                Frame::AckRequest => {
                    let h = self.received;
                    self.sink
                        .lock()
                        .await
                        .send(WsMessage::text(format!("<a xmlns='{SM}' h='{h}'/>")))
                        .await?;
                }
                Frame::Ack(h) => {
                    let mut outbox = self.outbox.lock().expect("outbox lock");
                    while outbox.unacked.front().is_some_and(|(n, _)| *n <= h) {
                        let (_, client_id) = outbox.unacked.pop_front().expect("just seen");
                        self.pending.push_back(Event::Sent {
                            msg_id: client_id.clone(),
                            client_id,
                        });
                    }
                }
                Frame::Close => return Ok(None),
                Frame::StreamError(why) => {
                    return Err(anyhow!("the server ended the stream: {why}"));
                }
                _ => return Ok(Some(Event::Other)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_message_gives_sender_body_and_archive_id() {
        let frame = parse(
            "<message xmlns='jabber:client' from='b_1@localhost/bench-x' to='b_2@localhost' \
             type='chat' id='c-1'><body>run:1:2:3:a&amp;b&#33;</body>\
             <stanza-id xmlns='urn:xmpp:sid:0' by='b_2@localhost' id='1700000'/></message>",
        )
        .unwrap();
        assert_eq!(
            frame,
            Frame::Message {
                from: "b_1@localhost/bench-x".into(),
                id: Some("c-1".into()),
                stanza_id: Some("1700000".into()),
                body: Some("run:1:2:3:a&b!".into()),
            }
        );
    }

    #[test]
    fn features_name_what_the_server_offers() {
        let frame = parse(
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
             <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>SCRAM-SHA-1</mechanism>\
             <mechanism>PLAIN</mechanism></mechanisms></stream:features>",
        )
        .unwrap();
        assert_eq!(
            frame,
            Frame::Features {
                plain: true,
                bind: false,
                sm: false
            }
        );
        let frame = parse(
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
             <bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/><sm xmlns='urn:xmpp:sm:2'/>\
             <sm xmlns='urn:xmpp:sm:3'/></stream:features>",
        )
        .unwrap();
        assert_eq!(
            frame,
            Frame::Features {
                plain: false,
                bind: true,
                sm: true
            }
        );
    }

    #[test]
    fn acks_errors_and_the_rest() {
        assert_eq!(
            parse("<a xmlns='urn:xmpp:sm:3' h='42'/>").unwrap(),
            Frame::Ack(42)
        );
        assert_eq!(
            parse("<r xmlns='urn:xmpp:sm:3'/>").unwrap(),
            Frame::AckRequest
        );
        assert!(parse("<a xmlns='urn:xmpp:sm:3'/>").is_err());
        assert_eq!(
            parse("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")
                .unwrap(),
            Frame::Failure("not-authorized".into())
        );
        assert_eq!(
            parse("<stream:error xmlns:stream='http://etherx.jabber.org/streams'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>")
                .unwrap(),
            Frame::StreamError("conflict".into())
        );
        assert_eq!(
            parse("<iq type='result' id='started' from='localhost'/>").unwrap(),
            Frame::Iq {
                id: "started".into(),
                kind: "result".into()
            }
        );
        assert!(parse("").is_err());
    }

    /// A server that takes the WebSocket, reads the stream's opening and then closes the
    /// connection (ejabberd under load, now and then): the start says [`NotOpened`], which
    /// the tool answers by connecting again; a server that closes later does not.
    #[tokio::test]
    async fn a_stream_closed_before_it_opened_is_told_apart() {
        async fn closing_after(frames: usize) -> anyhow::Error {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
                // The opening, answered as ejabberd would, `frames` times.
                let _ = ws.next().await;
                for _ in 0..frames {
                    let answer = format!("<open xmlns='{FRAMING}' from='{DOMAIN}' version='1.0'/>");
                    ws.send(WsMessage::text(answer)).await.unwrap();
                }
                let _ = ws.close(None).await;
            });
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
                .await
                .unwrap();
            let Err(e) = start(ws, "u", "p", "r").await else {
                panic!("the start succeeded against a server that closed");
            };
            server.await.unwrap();
            e
        }
        assert!(closing_after(0).await.is::<NotOpened>());
        let later = closing_after(1).await;
        assert!(
            !later.is::<NotOpened>() && later.to_string().contains("the stream's features"),
            "{later}"
        );
    }
}
