//! From the router to the client: pulls what its session has to send and
//! writes it for the client's protocol version, without I/O.
//!
//! The pull is bounded by the output buffer, not by the router: a client
//! that does not read stops being pulled from once its socket is full, and
//! what waits for it stays in its session queue, where the bounds and the
//! drop counters are.

use bytes::BytesMut;
use mqseal_router::{Millis, Outgoing, QoS, Router};
use tracing::info;

use crate::codec::{self, kind};
use crate::metrics::Metrics;
use crate::policy::{Client, Context};

/// Stop pulling once this much is waiting to be written.
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

impl Client {
    /// Writes what the router has for this client, up to
    /// [`OUTPUT_HIGH_WATER`]. Returns whether the router may have more.
    pub fn pull(&mut self, ctx: &Context<'_>, router: &mut Router, now: Millis, out: &mut BytesMut) -> bool {
        while out.len() < OUTPUT_HIGH_WATER {
            let Some(next) = router.poll_transmit(self.conn, now) else { return false };
            match next {
                Outgoing::PubRel(pkid) => codec::ack(self.version, kind::PUBREL, pkid, 0, out),
                Outgoing::Publish(d) => {
                    let start = out.len();
                    codec::publish(self.version, &d, now, out);
                    let size = out.len() - start;
                    match self.max_packet.filter(|max| size > *max) {
                        None => Metrics::inc(&ctx.metrics.messages_out_total),
                        Some(max) => {
                            // "Behave as if it had completed sending": the
                            // router must not keep redelivering what the
                            // client cannot take.
                            out.truncate(start);
                            Metrics::inc(&ctx.metrics.messages_discarded_too_large_total);
                            info!(peer = %self.peer, client_id = %self.principal.client_id, user = %self.principal.username, size, max,
                                  "publish discarded: larger than the client's maximum packet size");
                            match d.qos {
                                QoS::AtMostOnce => {}
                                QoS::AtLeastOnce => {
                                    let _ = router.puback(self.conn, d.pkid);
                                }
                                QoS::ExactlyOnce => {
                                    let _ = router.pubrec(self.conn, d.pkid, false);
                                }
                            }
                        }
                    }
                }
            }
        }
        true
    }
}
