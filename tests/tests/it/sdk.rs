//! The SDK in process (`yeongye_adapter::Adapter`) against the real broker: send, read the
//! queue with exactly-once effect, report progress, look up.

use yeongye_tests::sdk::{self, Received};
use yeongye_tests::{ReferralBuilder, System, v1};

use crate::{CENTRE, HOPE, SHORT};

fn states_of(got: &Received, rid: &str) -> Vec<v1::ReferralState> {
    got.notifications
        .iter()
        .filter(|(id, _)| id == rid)
        .map(|(_, s)| *s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sends_receives_updates_and_looks_up() {
    // The sender is the SDK in this process; the recipient is the adapter binary.
    let system = System::builder().adapters(&[HOPE]).start().await;
    let centre = sdk::connect(&system, CENTRE).await;
    let mut referral = ReferralBuilder::new(CENTRE, HOPE).build();
    // The SDK fills in the referral id and the sender when they are empty.
    referral.referral_id.clear();
    referral.from_agency.clear();
    let rid = centre.send(referral).await.expect("send");
    assert!(!rid.is_empty());

    let got = sdk::receive_until(&centre, SHORT, |got| {
        states_of(got, &rid).contains(&v1::ReferralState::Received)
    })
    .await;
    assert_eq!(
        states_of(&got, &rid),
        [v1::ReferralState::Delivered, v1::ReferralState::Received]
    );
    assert!(
        got.deliveries.is_empty() && got.rejections.is_empty(),
        "{got:#?}"
    );

    // The recipient accepts through its adapter's command line; the SDK sees it.
    system
        .adapter(HOPE)
        .cli(&["update", &rid, "accepted"])
        .await
        .assert_success();
    let got = sdk::receive_until(&centre, SHORT, |got| !got.notifications.is_empty()).await;
    assert_eq!(
        states_of(&got, &rid),
        [v1::ReferralState::Accepted],
        "{got:#?}"
    );

    // The sender cancels through the SDK; both sides hear of it.
    centre
        .update_status(&rid, v1::Status::Cancelled, "가구 전출")
        .await
        .expect("update");
    let got = sdk::receive_until(&centre, SHORT, |got| !got.notifications.is_empty()).await;
    assert_eq!(states_of(&got, &rid), [v1::ReferralState::Cancelled]);
    system
        .adapter(HOPE)
        .wait_notified(&rid, "CANCELLED", SHORT)
        .await;

    let reply = centre.status(&rid).await.expect("status");
    assert_eq!(reply.error, None);
    assert_eq!(reply.state(), v1::ReferralState::Cancelled);
    assert_eq!(reply.history.len(), 5, "{reply:?}");
    let unknown = centre
        .status(&yeongye_tests::wire::new_id())
        .await
        .expect("status");
    assert_eq!(
        unknown.error.map(|e| e.code()),
        Some(v1::ReasonCode::UnknownReferral)
    );
}
