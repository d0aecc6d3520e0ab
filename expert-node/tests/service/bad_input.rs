//! Every class of malformed request gets an in-band error with the right gRPC code, and
//! the same stream then answers a good request correctly.

use bytes::Bytes;
use switchyard_proto::pb::ForwardRequest;
use switchyard_proto::{WireFormat, encode_activations};
use tonic::Code;

use crate::harness::{Case, ForwardStream, HELD, client, full_store, output_of, start};

const HIDDEN: usize = 64;

fn good() -> ForwardRequest {
    Case::random(3, 1, 3, HIDDEN, &HELD).request(0, WireFormat::F32)
}

/// (what, mutation, expected code, a phrase the message must contain)
fn bad_requests() -> Vec<(&'static str, ForwardRequest, Code, &'static str)> {
    let with = |f: &dyn Fn(&mut ForwardRequest)| {
        let mut r = good();
        // Every assignment valid to start with, so only the mutation is wrong.
        r.token = vec![0, 1, 2];
        r.expert = vec![0, 5, 0];
        r.weight = vec![0.5, 0.25, 1.0];
        f(&mut r);
        r
    };
    vec![
        (
            "unspecified dtype",
            with(&|r| r.dtype = 0),
            Code::InvalidArgument,
            "dtype",
        ),
        (
            "unknown dtype",
            with(&|r| r.dtype = 99),
            Code::InvalidArgument,
            "dtype 99",
        ),
        (
            "layer out of range",
            with(&|r| r.layer = 4),
            Code::InvalidArgument,
            "layer 4",
        ),
        (
            "huge layer",
            with(&|r| r.layer = u32::MAX),
            Code::InvalidArgument,
            "layer",
        ),
        (
            "ragged assignment arrays",
            with(&|r| r.expert.truncate(2)),
            Code::InvalidArgument,
            "differ in length",
        ),
        (
            "missing weights",
            with(&|r| r.weight.clear()),
            Code::InvalidArgument,
            "differ in length",
        ),
        (
            "expert out of range",
            with(&|r| r.expert[1] = 8),
            Code::InvalidArgument,
            "expert 8",
        ),
        (
            "huge expert id",
            with(&|r| r.expert[1] = u32::MAX),
            Code::InvalidArgument,
            "out of range",
        ),
        (
            "expert not held",
            with(&|r| r.expert[2] = 3),
            Code::NotFound,
            "expert 3 of layer 1",
        ),
        (
            "token out of range",
            with(&|r| r.token[1] = 3),
            Code::InvalidArgument,
            "token index 3",
        ),
        (
            "NaN weight",
            with(&|r| r.weight[0] = f32::NAN),
            Code::InvalidArgument,
            "not finite",
        ),
        (
            "infinite weight",
            with(&|r| r.weight[2] = f32::INFINITY),
            Code::InvalidArgument,
            "not finite",
        ),
        (
            "activations one byte short",
            with(&|r| r.activations = r.activations.slice(1..)),
            Code::InvalidArgument,
            "activation bytes",
        ),
        (
            "activations for the wrong token count",
            with(&|r| r.num_tokens = 4),
            Code::InvalidArgument,
            "activation bytes",
        ),
        (
            "bf16 bytes labelled f32-sized",
            with(&|r| r.dtype = WireFormat::Bf16.to_proto() as i32),
            Code::InvalidArgument,
            "activation bytes",
        ),
        (
            "token count that overflows the byte length",
            with(&|r| r.num_tokens = u32::MAX),
            Code::InvalidArgument,
            "activation bytes",
        ),
        (
            "no activations at all",
            with(&|r| r.activations = Bytes::new()),
            Code::InvalidArgument,
            "activation bytes",
        ),
        (
            "duplicate (token, expert) pair",
            with(&|r| r.token[2] = 0),
            Code::InvalidArgument,
            "token 0 is assigned to expert 0 more than once",
        ),
        (
            "more assignments than tokens x experts",
            with(&|r| {
                r.token = vec![0; 25];
                r.expert = vec![0; 25];
                r.weight = vec![0.5; 25];
            }),
            Code::InvalidArgument,
            "25 assignments for 3 tokens",
        ),
        (
            "NaN activation",
            with(&|r| {
                let mut x = vec![0.5f32; 3 * HIDDEN];
                x[HIDDEN + 7] = f32::NAN;
                r.activations = encode_activations(&x, WireFormat::F32);
            }),
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "infinite bf16 activation",
            with(&|r| {
                let mut x = vec![0.5f32; 3 * HIDDEN];
                x[2 * HIDDEN] = f32::NEG_INFINITY;
                r.dtype = WireFormat::Bf16.to_proto() as i32;
                r.activations = encode_activations(&x, WireFormat::Bf16);
            }),
            Code::InvalidArgument,
            "non-finite",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_in_band_and_the_stream_survives() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    let mut stream = ForwardStream::open(&mut client).await;

    for (i, (what, mut req, code, phrase)) in bad_requests().into_iter().enumerate() {
        let id = 1000 + 2 * i as u64;
        req.id = id;
        let dtype = req.dtype;
        let resp = stream.call(req).await;
        assert_eq!(resp.id, id, "{what}");
        assert_eq!(resp.error_code, code as i32, "{what}: {}", resp.error);
        assert!(
            resp.error.contains(phrase),
            "{what}: message `{}` lacks `{phrase}`",
            resp.error
        );
        assert!(resp.output.is_empty(), "{what}");
        assert_eq!(resp.dtype, dtype, "{what}");

        // The next request on the same stream is served normally.
        let case = Case::random(id, (i % 4) as u32, 5, HIDDEN, &HELD);
        let resp = stream.call(case.request(id + 1, WireFormat::F32)).await;
        let got = output_of(&resp, id + 1, WireFormat::F32, 5, HIDDEN);
        assert_eq!(
            got,
            case.expected(&reference, WireFormat::F32),
            "after {what}"
        );
    }
    node.shutdown().await;
}
