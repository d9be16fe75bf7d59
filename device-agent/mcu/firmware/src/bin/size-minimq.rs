//! Footprint reference: minimq alone, doing what the agent's loop does with
//! MQTT (connect with a will, subscribe to two topics, publish a retained
//! status, echo every publish) but verifying nothing. Subtracted from the
//! agent image it shows what mqseal adds on top of the MQTT client.
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use minimq::{Buffers, ConfigBuilder, Publication, QoS, Session, TopicFilter, Will};
use mqseal_mcu_firmware::{ScriptIo, block_on, halt};
use panic_halt as _;

#[entry]
fn main() -> ! {
    let (mut rx, mut tx) = ([0u8; 512], [0u8; 640]);
    let Ok(will) = Will::new(black_box("dev/status"), b"offline", &[]) else { halt() };
    let config = ConfigBuilder::new(Buffers::new(&mut rx, &mut tx))
        .client_id(black_box("valve-3"))
        .and_then(|c| c.auth(black_box("valve-3"), black_box(b"password")))
        .and_then(|c| c.will(will.retained().qos(QoS::AtLeastOnce)));
    let Ok(config) = config else { halt() };
    let mut session = Session::new(config.keepalive_interval(60));
    let mut sent = [0u8; 64];
    loop {
        let io = ScriptIo::new(black_box(&[]), &mut sent);
        let ended = block_on(async {
            let mut conn = session.connect(io).await?;
            conn.subscribe(&[TopicFilter::new(black_box("dev/cmd")), TopicFilter::new(black_box("dev/req"))], &[])
                .await?;
            conn.publish(Publication::new("dev/status", &b"online"[..]).retain())
                .await
                .map_err(|_| minimq::Error::NotReady)?;
            let mut echo = [0u8; 320];
            loop {
                let n = {
                    let p = conn.recv().await?;
                    let n = p.payload().len().min(echo.len());
                    echo.get_mut(..n).unwrap_or(&mut []).copy_from_slice(p.payload().get(..n).unwrap_or(&[]));
                    n
                };
                conn.publish(Publication::new("dev/resp", echo.get(..n).unwrap_or(&[])))
                    .await
                    .map_err(|_| minimq::Error::NotReady)?;
            }
            #[allow(unreachable_code)]
            Ok::<(), minimq::Error<mqseal_mcu_firmware::ScriptEnd>>(())
        });
        let _ = black_box(ended);
    }
}
