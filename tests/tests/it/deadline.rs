//! The receipt deadline: a referral nobody acknowledges by `receive_by_ms` becomes EXPIRED and
//! both sides are told; one acknowledged in time does not.

use std::time::Duration;

use yeongye_tests::{ReferralBuilder, System, now_ms, v1};

use crate::{CENTRE, HOPE, MENTAL, SHORT, barrier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_not_received_by_its_deadline_expires() {
    // The mental health centre's adapter is not running: nobody will acknowledge.
    let mut system = System::builder().adapters(&[CENTRE, HOPE]).start().await;
    let centre = system.wire(CENTRE).await;
    let deadline = now_ms() + 2000;
    let unheard = ReferralBuilder::new(CENTRE, MENTAL)
        .receive_by_ms(deadline)
        .build();
    let heard = ReferralBuilder::new(CENTRE, HOPE)
        .receive_by_ms(deadline)
        .build();
    centre.send_referral(&unheard).await;
    centre.send_referral(&heard).await;

    let sender = system.adapter(CENTRE);
    sender
        .wait_notified(&unheard.referral_id, "EXPIRED", SHORT)
        .await;
    let reply = centre.query(&unheard.referral_id).await;
    assert_eq!(reply.state(), v1::ReferralState::Expired);
    assert_eq!(reply.receive_by_ms, deadline);
    let last = reply.history.last().expect("history");
    assert_eq!(last.by_agency, "broker");
    assert!(
        last.at_ms >= deadline,
        "expired at {} before the deadline {deadline}",
        last.at_ms
    );
    assert_eq!(
        sender.notified_states(&unheard.referral_id),
        ["DELIVERED", "EXPIRED"]
    );

    // The one acknowledged in time stays RECEIVED past its deadline.
    sender
        .wait_notified(&heard.referral_id, "RECEIVED", SHORT)
        .await;
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(deadline + 1500 - now_ms()).unwrap_or(0),
    ))
    .await;
    assert_eq!(
        centre.state(&heard.referral_id).await,
        Some(v1::ReferralState::Received)
    );

    // When the recipient's adapter comes up it is told, and its late receipt changes nothing.
    system.start_adapter(MENTAL);
    system
        .adapter(MENTAL)
        .wait_notified(&unheard.referral_id, "EXPIRED", SHORT)
        .await;
    barrier(&system, CENTRE, MENTAL).await;
    assert_eq!(
        centre.state(&unheard.referral_id).await,
        Some(v1::ReferralState::Expired)
    );
    for rejection in system.adapter(MENTAL).rejections() {
        assert_eq!(
            rejection.code().as_deref(),
            Some("TERMINAL_STATE"),
            "{}",
            rejection.raw
        );
    }
    assert_eq!(
        system.adapter(CENTRE).notified_states(&unheard.referral_id),
        ["DELIVERED", "EXPIRED"],
        "nothing after EXPIRED"
    );
}
