//! LoadExperts / UnloadExperts / Describe, and epoch fencing.

use switchyard_proto::WireFormat;
use switchyard_proto::pb::{DescribeRequest, ExpertRef, ExpertsRequest};
use tonic::Code;

use crate::harness::{Case, ForwardStream, HELD, client, full_store, output_of, start};

const LAYERS: u32 = 4;
const HIDDEN: usize = 64;

fn refs(experts: &[u32]) -> Vec<ExpertRef> {
    (0..LAYERS)
        .flat_map(|layer| {
            experts
                .iter()
                .map(move |&expert| ExpertRef { layer, expert })
        })
        .collect()
}

fn held(info: &switchyard_proto::pb::NodeInfo) -> Vec<(u32, u32)> {
    info.held.iter().map(|r| (r.layer, r.expert)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_forward_unload_describe_and_stale_epochs() {
    let node = start().await;
    let reference = full_store();
    let mut client = client(node.addr).await;
    let mut stream = ForwardStream::open(&mut client).await;

    let info = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(info.model, "mixtral-tiny");
    assert_eq!(
        (info.num_layers, info.num_experts, info.hidden_size),
        (4, 8, 64)
    );
    assert_eq!(info.bytes_per_expert, 3 * 64 * 128 * 4);
    assert_eq!(info.device, "cpu");
    assert_eq!(info.epoch, 0);
    let initial = held(&info);
    assert_eq!(
        initial,
        refs(&HELD)
            .iter()
            .map(|r| (r.layer, r.expert))
            .collect::<Vec<_>>()
    );

    let with_three = Case::random(11, 2, 6, HIDDEN, &[0, 3, 5]);
    assert!(with_three.work.iter().any(|a| a.expert == 3));
    let resp = stream.call(with_three.request(1, WireFormat::F32)).await;
    assert_eq!(resp.error_code, Code::NotFound as i32, "{}", resp.error);

    // Load expert 3 everywhere, at a newer epoch.
    let info = client
        .load_experts(ExpertsRequest {
            experts: refs(&[3]),
            epoch: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        held(&info),
        refs(&[0, 3, 5])
            .iter()
            .map(|r| (r.layer, r.expert))
            .collect::<Vec<_>>()
    );
    assert_eq!(info.epoch, 4);
    let resp = stream.call(with_three.request(2, WireFormat::F32)).await;
    let got = output_of(&resp, 2, WireFormat::F32, 6, HIDDEN);
    assert_eq!(got, with_three.expected(&reference, WireFormat::F32));

    // Loading again is a no-op at the same epoch.
    let again = client
        .load_experts(ExpertsRequest {
            experts: refs(&[3, 5]),
            epoch: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held(&again), held(&info));

    // A stale leader can neither load nor unload; epoch 0 (a recovery load) only adds.
    for epoch in [0, 3] {
        let err = client
            .unload_experts(ExpertsRequest {
                experts: refs(&[3]),
                epoch,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("stale"), "{err}");
    }
    let err = client
        .load_experts(ExpertsRequest {
            experts: refs(&[1]),
            epoch: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // Nonexistent experts are refused as a whole; nothing is loaded.
    for bad in [
        ExpertRef {
            layer: 4,
            expert: 0,
        },
        ExpertRef {
            layer: 0,
            expert: 8,
        },
    ] {
        let err = client
            .load_experts(ExpertsRequest {
                experts: vec![
                    ExpertRef {
                        layer: 0,
                        expert: 1,
                    },
                    bad,
                ],
                epoch: 4,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    let info = client
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.epoch, 4);
    assert_eq!(held(&info), held(&again));

    // Unload at a newer epoch: expert 3 is gone again, on the same stream.
    let info = client
        .unload_experts(ExpertsRequest {
            experts: refs(&[3]),
            epoch: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held(&info), initial);
    assert_eq!(info.epoch, 5);
    let resp = stream.call(with_three.request(3, WireFormat::F32)).await;
    assert_eq!(resp.error_code, Code::NotFound as i32, "{}", resp.error);
    // ...while the experts still held keep working.
    let case = Case::random(12, 2, 6, HIDDEN, &HELD);
    let resp = stream.call(case.request(4, WireFormat::F32)).await;
    let got = output_of(&resp, 4, WireFormat::F32, 6, HIDDEN);
    assert_eq!(got, case.expected(&reference, WireFormat::F32));

    // A recovery load (epoch 0) adds without touching the epoch.
    let recovered = client
        .load_experts(ExpertsRequest {
            experts: refs(&[1]),
            epoch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.epoch, 5, "a recovery load leaves the epoch alone");
    assert_eq!(held(&recovered).len(), held(&info).len() + 4);
    node.shutdown().await;
}
