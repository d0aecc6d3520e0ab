//! Feeds a checkpoint's config.json, unchanged, to the stock
//! `candle_transformers::models::deepseek2::DeepSeekV2Config` and prints what serde says.
//!
//! cargo run --release --example stock_config -- MODEL_DIR

fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = std::env::args()
        .nth(1)
        .context("usage: stock_config MODEL_DIR")?;
    let path = std::path::Path::new(&dir).join("config.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str::<candle_transformers::models::deepseek2::DeepSeekV2Config>(&text) {
        Ok(c) => println!("stock candle parses it: {c:?}"),
        Err(e) => println!("stock candle rejects it: {e}"),
    }
    Ok(())
}
