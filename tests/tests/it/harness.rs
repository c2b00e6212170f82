//! The harness itself: a nats-server restarts on its port and store, a broker becomes ready and
//! answers queries.

use std::time::Duration;

use yeongye_tests::{ReferralBuilder, System, v1};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_answers_and_survives_a_nats_restart() {
    let mut system = System::builder().adapters(&[]).start().await;
    let wire = system.wire("hope-support").await;
    let referral = ReferralBuilder::new("hope-support", "mental-health").build();
    wire.send_referral(&referral).await;
    yeongye_tests::wait_for(
        "the referral to be DELIVERED",
        Duration::from_secs(10),
        || async {
            (wire.state(&referral.referral_id).await == Some(v1::ReferralState::Delivered))
                .then_some(())
        },
        || system.describe(),
    )
    .await;
    system.nats.restart().await;
    let reply = wire.query(&referral.referral_id).await;
    assert_eq!(reply.state(), v1::ReferralState::Delivered);
}
