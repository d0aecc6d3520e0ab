//! Good requests: the node's answers equal the engine's `combine` computed locally.

use switchyard_proto::WireFormat;
use switchyard_proto::pb::ForwardRequest;

use crate::harness::{
    Case, ForwardStream, HELD, assert_bf16_close, client, full_store, output_of, start,
};

const HIDDEN: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_local_combine_over_one_stream() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    let mut stream = ForwardStream::open(&mut client).await;

    // Every layer, a spread of batch sizes, both wire formats; all sent before any answer
    // is read, as a pipelining coordinator would.
    let mut cases = Vec::new();
    for (i, (layer, tokens)) in [(0, 1), (1, 7), (2, 33), (3, 5), (0, 64), (3, 2)]
        .into_iter()
        .enumerate()
    {
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let id = 100 + cases.len() as u64;
            let case = Case::random(i as u64 * 7 + id, layer, tokens, HIDDEN, &HELD);
            stream.send(case.request(id, format)).await;
            cases.push((id, format, case));
        }
    }
    // Requests are computed concurrently and answered as they finish: the id says which.
    let mut answers = std::collections::HashMap::new();
    for _ in 0..cases.len() {
        let resp = stream.recv().await;
        assert!(
            answers.insert(resp.id, resp).is_none(),
            "an id answered twice"
        );
    }
    let mut assigned = 0;
    for (id, format, case) in &cases {
        let resp = answers.remove(id).expect("every request answered");
        let got = output_of(&resp, *id, *format, case.tokens, HIDDEN);
        let want = case.expected(&reference, *format);
        match format {
            WireFormat::F32 => assert_eq!(got, want, "request {id}"),
            WireFormat::Bf16 => assert_bf16_close(&got, &want),
        }
        assert!(got.iter().any(|v| *v != 0.0) || case.work.is_empty());
        assigned += case.work.len();
    }
    assert!(assigned > 50, "the random cases exercised too little work");

    // Empty work is a valid request with an empty answer.
    let resp = stream
        .call(ForwardRequest {
            id: 7,
            layer: 2,
            num_tokens: 0,
            dtype: WireFormat::Bf16.to_proto() as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(
        output_of(&resp, 7, WireFormat::Bf16, 0, HIDDEN),
        Vec::<f32>::new()
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_assignments_answer_zero_and_streams_are_independent() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    let mut a = ForwardStream::open(&mut client).await;
    let mut b = ForwardStream::open(&mut client).await;

    let mut case = Case::random(1, 1, 4, HIDDEN, &HELD);
    case.work.retain(|w| w.token != 2);
    case.work.push(switchyard_engine::Assignment {
        token: 0,
        expert: 5,
        weight: 0.5,
    });
    a.send(case.request(1, WireFormat::F32)).await;
    b.send(case.request(2, WireFormat::F32)).await;
    let from_b = output_of(&b.recv().await, 2, WireFormat::F32, 4, HIDDEN);
    let from_a = output_of(&a.recv().await, 1, WireFormat::F32, 4, HIDDEN);
    assert_eq!(from_a, case.expected(&reference, WireFormat::F32));
    assert_eq!(from_a, from_b);
    assert!(from_a[2 * HIDDEN..3 * HIDDEN].iter().all(|v| *v == 0.0));
    node.shutdown().await;
}
