//! Runs one trainer per given daemon socket: each all-reduces a vector and
//! prints what it got. Start a cluster first:
//!
//! ```sh
//! cargo run --release --locked -p phalanx-testkit --bin phalanx-local-cluster -- --members 3
//! cargo run --release --locked -p phalanx-client --example allreduce -- SOCKET1 SOCKET2 SOCKET3
//! ```

use phalanx_client::{Client, ReduceOp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sockets: Vec<String> = std::env::args().skip(1).collect();
    if sockets.is_empty() {
        return Err(
            "usage: allreduce SOCKET... (one per member; see phalanx-local-cluster)".into(),
        );
    }
    let trainers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || -> Result<String, phalanx_client::ClientError> {
                let mut client = Client::connect(&socket)?;
                let me = client.member();
                // Each member contributes its id; the mean is the same everywhere.
                let mut grads = vec![me.0 as f32; 4];
                let info = client.all_reduce(&mut grads, ReduceOp::Mean)?;
                Ok(format!(
                    "{me}: mean {:?} over {:?} (op {}, {})",
                    grads, info.contributors, info.op, info.epoch
                ))
            })
        })
        .collect();
    for t in trainers {
        println!("{}", t.join().map_err(|_| "trainer panicked")??);
    }
    Ok(())
}
