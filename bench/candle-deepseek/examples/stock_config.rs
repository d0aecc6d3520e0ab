//! Feeds a checkpoint's config.json, unchanged, to the stock
//! `candle_transformers::models::deepseek2::DeepSeekV2Config` and prints what serde says.
//!
//! cargo run --release --example stock_config -- MODEL_DIR

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: stock_config MODEL_DIR");
    let text = std::fs::read_to_string(std::path::Path::new(&dir).join("config.json"))
        .expect("reading config.json");
    match serde_json::from_str::<candle_transformers::models::deepseek2::DeepSeekV2Config>(&text) {
        Ok(c) => println!("stock candle parses it: {c:?}"),
        Err(e) => println!("stock candle rejects it: {e}"),
    }
}
