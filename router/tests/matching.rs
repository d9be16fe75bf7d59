//! The subscription index and the retained store against MQTT's rules as
//! written (`topic::matches`), on random topics and filters. The alphabet
//! is small on purpose, so that random filters and topics collide often,
//! and includes the edge cases: empty levels, `$` first levels, `#` after
//! its parent level, `+` at the start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use mqseal_router::index::{Hit, Index};
use mqseal_router::retained::Retained;
use mqseal_router::topic::{matches, valid_filter, valid_topic_name};
use mqseal_router::{Message, QoS, SubOptions};
use proptest::prelude::*;

fn topic_level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just(String::new()), Just("c".to_owned())]
}

fn topic_name() -> impl Strategy<Value = String> {
    (prop::bool::weighted(0.2), prop::collection::vec(topic_level(), 1..5))
        .prop_map(|(dollar, mut levels)| {
            if dollar {
                levels[0] = "$s".to_owned();
            }
            levels.join("/")
        })
        .prop_filter("a topic name is not empty", |t| !t.is_empty())
}

fn filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![topic_level(), Just("+".to_owned())];
    (prop::bool::weighted(0.1), prop::collection::vec(level, 0..5), prop::bool::weighted(0.3)).prop_filter_map(
        "a filter needs a level",
        |(dollar, mut levels, hash)| {
            if dollar && !levels.is_empty() {
                levels[0] = "$s".to_owned();
            }
            if hash {
                levels.push("#".to_owned());
            }
            Some(levels.join("/")).filter(|f| !f.is_empty())
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_index_agrees_with_the_rules(
        filters in prop::collection::vec(filter(), 1..40),
        topics in prop::collection::vec(topic_name(), 1..20),
        removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut index = Index::default();
        let mut live: Vec<(u32, String)> = Vec::new();
        for (slot, f) in filters.iter().enumerate() {
            let slot = slot as u32;
            index.insert(f, slot, SubOptions::qos(QoS::AtLeastOnce));
            live.push((slot, f.clone()));
        }
        for r in &removed {
            if live.is_empty() { break; }
            let (slot, f) = live.remove(r.index(live.len()));
            prop_assert!(index.remove(&f, slot));
        }
        prop_assert_eq!(index.len(), live.len());
        for t in &topics {
            prop_assert!(valid_topic_name(t));
            let want: BTreeSet<u32> = live.iter().filter(|(_, f)| matches(f, t)).map(|(s, _)| *s).collect();
            let mut got = BTreeSet::new();
            index.for_each_match(t, &mut |hit| match hit {
                Hit::Direct(slot, _) => { assert!(got.insert(slot), "slot {slot} matched twice on {t}"); }
                Hit::Group(_) => panic!("no groups here"),
            });
            prop_assert_eq!(got, want, "topic {:?}", t);
        }
    }

    #[test]
    fn retained_lookup_agrees_with_the_rules(
        topics in prop::collection::vec(topic_name(), 1..30),
        filters in prop::collection::vec(filter(), 1..20),
    ) {
        let mut retained = Retained::new(usize::MAX, usize::MAX);
        for t in &topics {
            retained.apply(Arc::new(Message::new(t, &b"x"[..], QoS::AtMostOnce, true))).unwrap();
        }
        let unique: BTreeSet<&String> = topics.iter().collect();
        prop_assert_eq!(retained.len(), unique.len());
        for f in &filters {
            let want: BTreeSet<String> = unique.iter().filter(|t| matches(f, t)).map(|t| (*t).clone()).collect();
            let got: BTreeSet<String> = retained.matching(f, 0).iter().map(|m| m.topic.to_string()).collect();
            prop_assert_eq!(got, want, "filter {:?}", f);
        }
    }

    #[test]
    fn shared_groups_match_like_their_filter(f in filter(), topics in prop::collection::vec(topic_name(), 1..10)) {
        let shared = format!("$share/g/{f}");
        let mut index = Index::default();
        index.insert(&shared, 7, SubOptions::qos(QoS::AtMostOnce));
        for t in &topics {
            let mut got = Vec::new();
            index.for_each_match(t, &mut |hit| if let Hit::Group(g) = hit { got.extend(g.pick(|_| true)); });
            prop_assert_eq!(!got.is_empty(), matches(&f, t));
        }
    }
}

#[test]
fn generated_filters_are_valid_mqtt_or_dollar() {
    // The strategies above produce `$s` filters, which subscribers may not
    // send (valid_filter refuses them) but the index must still treat by
    // the rules; everything else they produce is a valid filter.
    assert!(valid_filter("a/+/#") && valid_filter("+") && valid_filter("/#"));
    assert!(!valid_filter("$s/#"));
}
