//! `quiver search`: k nearest neighbours of a vector, optionally filtered
//! on metadata.

use anyhow::{anyhow, Result};
use quiver_store::{Filter, Hit, Store};

use crate::args::SearchArgs;
use crate::output;

/// Longest content shown in a text table cell.
const CONTENT_CHARS: usize = 60;

pub fn run(store: &Store, args: SearchArgs, json: bool) -> Result<()> {
    let vector: Vec<f32> = serde_json::from_str(&args.vector)
        .map_err(|e| anyhow!("--vector must be a JSON array of numbers, e.g. '[0.1, 0.2]': {e}"))?;
    let filter = args.filter.as_deref().map(parse_filter).transpose()?;
    let hits = store.search(&args.collection, &vector, args.k, filter.as_ref())?;
    if json {
        // A struct, not `json!`, so each hit keeps its field order.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            hits: &'a [Hit],
        }
        return output::json(&Out { hits: &hits });
    }
    print_table(&hits);
    Ok(())
}

fn parse_filter(text: &str) -> Result<Filter> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        anyhow!("--filter must be a JSON object, e.g. '{{\"lang\": \"en\", \"year\": {{\"$gte\": 2020}}}}': {e}")
    })?;
    Filter::from_json(&v).map_err(|e| anyhow!("--filter: {e}"))
}

fn print_table(hits: &[Hit]) {
    if hits.is_empty() {
        println!("no matches");
        return;
    }
    let with_content = hits.iter().any(|h| h.content.is_some());
    let rows: Vec<Vec<String>> = hits
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut row = vec![
                (i + 1).to_string(),
                h.id.clone(),
                format!("{:.6}", h.distance),
                h.metadata.to_string(),
            ];
            if with_content {
                row.push(
                    h.content
                        .as_deref()
                        .map(shorten)
                        .unwrap_or_else(|| "-".into()),
                );
            }
            row
        })
        .collect();
    let mut headers = vec!["rank", "id", "distance", "metadata"];
    if with_content {
        headers.push("content");
    }
    output::table(&headers, &rows);
}

fn shorten(text: &str) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= CONTENT_CHARS {
        return one_line;
    }
    let mut s: String = one_line.chars().take(CONTENT_CHARS - 1).collect();
    s.push('…');
    s
}
