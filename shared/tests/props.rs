//! Property tests of the bus entries (MessagePack, `protocol::encode` /
//! `decode`), the one parser of `shared` that reads bytes another process
//! wrote: a gateway's command in a stream, a worker's outcome or channel
//! event on pub/sub, a membership change. Whatever the text of a message
//! (any Unicode, NUL included: refusing NUL is the gateway's job), every
//! entry survives the round trip unchanged; arbitrary or truncated bytes
//! are an error, never a panic or a huge allocation; and a channel's
//! partition is always in range.

use std::collections::HashMap;

use proptest::prelude::*;
use switchboard_shared::bus::partition_of;
use switchboard_shared::protocol::{
    decode, encode, Author, ChannelEvent, Command, CommandEnvelope, MembershipChange,
    MembershipKind, Origin, Outcome, OutcomeResult, ReactionCommand, ReadCommand, SendMessage,
};
use uuid::Uuid;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// Any text, NUL and astral characters included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        "\\PC{0,16}",
        Just(String::new()),
        Just("\0".into())
    ]
}

fn arb_origin() -> impl Strategy<Value = Origin> {
    (
        text(),
        prop_oneof![Just("/"), Just("/api/socket.io")],
        text(),
    )
        .prop_map(|(node, ns, sid)| Origin {
            node,
            ns: ns.into(),
            sid,
        })
}

fn arb_reaction() -> impl Strategy<Value = ReactionCommand> {
    (arb_uuid(), arb_uuid(), arb_uuid(), text(), text()).prop_map(
        |(request_id, channel_id, message_id, user_id, kind)| ReactionCommand {
            request_id,
            channel_id,
            message_id,
            user_id,
            kind,
        },
    )
}

fn arb_command() -> impl Strategy<Value = Command> {
    let send = (
        arb_uuid(),
        arb_uuid(),
        (text(), text(), proptest::option::of(text())),
        text(),
        proptest::option::of(text()),
        proptest::option::of(arb_uuid()),
    )
        .prop_map(
            |(id, channel_id, (aid, name, image_url), content, temp_id, reply_to_id)| {
                Command::SendMessage(SendMessage {
                    id,
                    channel_id,
                    author: Author {
                        id: aid,
                        name,
                        image_url,
                    },
                    content,
                    temp_id,
                    reply_to_id,
                })
            },
        );
    let read = (arb_uuid(), arb_uuid(), arb_uuid(), text()).prop_map(
        |(request_id, channel_id, message_id, user_id)| {
            Command::ReadMessage(ReadCommand {
                request_id,
                channel_id,
                message_id,
                user_id,
            })
        },
    );
    prop_oneof![
        send,
        arb_reaction().prop_map(Command::AddReaction),
        arb_reaction().prop_map(Command::RemoveReaction),
        read,
    ]
}

fn arb_envelope() -> impl Strategy<Value = CommandEnvelope> {
    (
        arb_origin(),
        prop::collection::hash_map(text(), text(), 0..3),
        arb_command(),
        any::<i64>(),
    )
        .prop_map(|(origin, trace, command, accepted_ms)| CommandEnvelope {
            origin,
            trace: trace.into_iter().collect::<HashMap<_, _>>(),
            command,
            accepted_ms,
        })
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    (
        arb_origin(),
        arb_uuid(),
        proptest::option::of(text()),
        prop_oneof![
            arb_uuid().prop_map(|message_id| OutcomeResult::Delivered { message_id }),
            Just(OutcomeResult::Done),
            text().prop_map(|error| OutcomeResult::Failed { error }),
        ],
    )
        .prop_map(|(origin, request_id, temp_id, result)| Outcome {
            origin,
            request_id,
            temp_id,
            result,
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn commands_round_trip(env in arb_envelope()) {
        let bytes = encode(&env).expect("encode");
        let back: CommandEnvelope = decode(&bytes).expect("decode");
        prop_assert_eq!(&back, &env);
        prop_assert_eq!(back.command.channel_id(), env.command.channel_id());
        prop_assert_eq!(back.command.request_id(), env.command.request_id());
    }

    #[test]
    fn outcomes_round_trip(o in arb_outcome()) {
        let back: Outcome = decode(&encode(&o).expect("encode")).expect("decode");
        prop_assert_eq!(back, o);
    }

    #[test]
    fn membership_changes_round_trip(
        user_id in text(),
        channel_id in arb_uuid(),
        left in any::<bool>(),
        position in proptest::option::of(any::<i64>()),
    ) {
        let m = MembershipChange {
            user_id,
            channel_id,
            kind: if left { MembershipKind::Left } else { MembershipKind::Joined },
            position,
        };
        let back: MembershipChange = decode(&encode(&m).expect("encode")).expect("decode");
        prop_assert_eq!(back, m);
    }

    /// Random bytes, and every truncation of a real entry: an error or a
    /// value, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        env in arb_envelope(),
        cut in any::<prop::sample::Index>(),
    ) {
        let _ = decode::<CommandEnvelope>(&bytes);
        let _ = decode::<Outcome>(&bytes);
        let _ = decode::<ChannelEvent>(&bytes);
        let _ = decode::<MembershipChange>(&bytes);
        let full = encode(&env).expect("encode");
        let truncated = &full[..cut.index(full.len())];
        prop_assert!(decode::<CommandEnvelope>(truncated).is_err());
    }

    #[test]
    fn partitions_are_in_range(channel in arb_uuid(), partitions in any::<u32>()) {
        let p = partition_of(&channel, partitions);
        prop_assert!(p < partitions.max(1));
        prop_assert_eq!(p, partition_of(&channel, partitions));
    }
}

/// Length prefixes announcing billions of elements are refused without
/// allocating them (a corrupt or hostile entry cannot exhaust a worker).
#[test]
fn huge_length_prefixes_do_not_allocate() {
    // map32 / array32 / str32 / bin32 with a 4 GiB length and no content.
    for prefix in [0xdfu8, 0xdd, 0xdb, 0xc6] {
        let bytes = [prefix, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<CommandEnvelope>(&bytes).is_err());
        assert!(decode::<ChannelEvent>(&bytes).is_err());
        assert!(decode::<Vec<String>>(&bytes).is_err());
    }
}
