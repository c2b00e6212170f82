//! The receipt deadline: a referral nobody acknowledges by `receive_by_ms` becomes EXPIRED and
//! both sides are told; one acknowledged in time does not.

use yeongye_tests::{ReferralBuilder, System, now_ms, v1};

use crate::{CENTRE, HOPE, MENTAL, SHORT, barrier};

const HOUR_MS: i64 = 3_600_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_referral_not_received_by_its_deadline_expires() {
    // The mental health centre's adapter is not running: nobody will acknowledge. The broker's
    // clock is moved past the deadline by its testing offset file, not waited for: a receipt
    // that takes long on a slow machine cannot make the test fail.
    let mut system = System::builder()
        .adapters(&[CENTRE, HOPE])
        .broker_config(|c| {
            c.with_test_clock();
        })
        .start()
        .await;
    system.broker.set_clock_offset(0);
    let centre = system.wire(CENTRE).await;
    let deadline = now_ms() + HOUR_MS;
    let unheard = ReferralBuilder::new(CENTRE, MENTAL)
        .receive_by_ms(deadline)
        .build();
    let heard = ReferralBuilder::new(CENTRE, HOPE)
        .receive_by_ms(deadline)
        .build();
    centre.send_referral(&unheard).await;
    centre.send_referral(&heard).await;

    // The one the recipient's adapter takes is RECEIVED in time; then two hours pass.
    let sender = system.adapter(CENTRE);
    sender
        .wait_notified(&heard.referral_id, "RECEIVED", SHORT)
        .await;
    system.broker.set_clock_offset(2 * HOUR_MS);
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
    // The acknowledged one had the same deadline, checked in the same pass: it stays RECEIVED.
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
