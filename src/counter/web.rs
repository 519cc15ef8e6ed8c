//! The counter's web page: plain server-rendered HTML forms on a loopback address, one POST
//! per action, the server's answer shown above the forms.
//!
//! Browsers on the staff machine also visit other sites, so the page defends itself against
//! cross-site requests: the `Host` header must name the console's own address (no DNS
//! rebinding), a present `Origin` must be the console's, and every form carries a one-time
//! token that doubles as the staff operation's op_ref, so a resubmitted form (reload, double
//! click) repeats the same operation and shows the same answer instead of doing it twice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use ring::rand::{SecureRandom, SystemRandom};

use super::ops::{parse_amount, parse_card, parse_reason, Answer, Counter, Op};

/// Largest form body: the biggest form has three short fields.
const MAX_FORM_BYTES: usize = 4 * 1024;
/// Answers remembered by form token, so a resubmitted form shows its first answer (a top-up has
/// no op_ref, so without this a reload would top the card up again). A few hours of one desk.
const REMEMBERED_ANSWERS: usize = 256;

/// Why the console will not listen somewhere.
#[derive(Debug, thiserror::Error)]
#[error("the counter console listens on loopback only (127.0.0.1 or ::1), not {0}: it holds the counter's certificate and has no login")]
pub struct NotLoopback(pub SocketAddr);

pub struct Console {
    counter: Counter,
    listen: SocketAddr,
    recent: Mutex<VecDeque<(u64, Answer)>>,
}

/// Binds `listen` (loopback only) and serves the page until `shutdown` resolves.
pub async fn serve(
    counter: Counter,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        return Err(NotLoopback(listen).into());
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    let console = Arc::new(Console { counter, listen: local, recent: Mutex::new(VecDeque::new()) });
    let app = Router::new()
        .route("/", get(index))
        .route("/op/{name}", post(action))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(console);
    ready(local);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

fn token() -> u64 {
    let mut bytes = [0u8; 8];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        // Without randomness, the clock in nanoseconds still differs from form to form.
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// The request must come from the console's own page (see the module docs).
fn same_origin(console: &Console, headers: &HeaderMap) -> bool {
    let port = console.listen.port();
    let allowed = [console.listen.to_string(), format!("localhost:{port}")];
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let Some(host) = host.filter(|h| allowed.iter().any(|a| a == h)) else { return false };
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => true,
        Some(Ok(origin)) => origin == format!("http://{host}"),
        Some(Err(_)) => false,
    }
}

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "requests must come from the counter console's own page\n")
        .into_response()
}

async fn index(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if !same_origin(&console, &headers) {
        return forbidden();
    }
    Html(page(&console, None)).into_response()
}

async fn action(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !same_origin(&console, &headers) {
        return forbidden();
    }
    let op = parse_op(&name, &form);
    let token: Option<u64> = field(&form, "token").parse().ok();
    let answer = match (op, token) {
        (Err(message), _) => Answer::failed(op_label(&name), message),
        (Ok(_), None) => Answer::failed(op_label(&name), "the form has expired: try again".into()),
        (Ok(op), Some(token)) => match remembered(&console, token) {
            Some(answer) => answer,
            None => {
                let answer = console.counter.run(&op, token).await;
                remember(&console, token, &answer);
                answer
            }
        },
    };
    Html(page(&console, Some(&answer))).into_response()
}

fn remembered(console: &Console, token: u64) -> Option<Answer> {
    // Short sections without .await: a std mutex is enough.
    let recent = console.recent.lock().unwrap_or_else(PoisonError::into_inner);
    recent.iter().find(|(t, _)| *t == token).map(|(_, a)| a.clone())
}

fn remember(console: &Console, token: u64, answer: &Answer) {
    // A failure without a server answer may be retried with the same form.
    if answer.status == "Error" {
        return;
    }
    let mut recent = console.recent.lock().unwrap_or_else(PoisonError::into_inner);
    if recent.len() >= REMEMBERED_ANSWERS {
        recent.pop_front();
    }
    recent.push_back((token, answer.clone()));
}

fn op_label(name: &str) -> &'static str {
    match name {
        "issue" => "issue",
        "topup" => "top-up",
        "balance" => "balance",
        "history" => "history",
        "block" => "block",
        "unblock" => "unblock",
        "replace" => "replace",
        "close" => "close",
        "setproduct" => "set product",
        _ => "unknown operation",
    }
}

fn field<'a>(form: &'a HashMap<String, String>, key: &str) -> &'a str {
    form.get(key).map_or("", String::as_str)
}

fn parse_op(name: &str, form: &HashMap<String, String>) -> Result<Op, String> {
    let field = |key: &str| field(form, key);
    let card = || parse_card(field("card"));
    Ok(match name {
        "issue" => Op::Issue { deposit: parse_amount(field("deposit"))? },
        "topup" => Op::TopUp { card: card()?, amount: parse_amount(field("amount"))? },
        "balance" => Op::Balance { card: card()? },
        "history" => {
            let limit = match field("limit").trim() {
                "" => 16,
                text => text.parse::<u16>().map_err(|_| "the number of entries is 1..=64")?,
            };
            if !(1..=64).contains(&limit) {
                return Err("the number of entries is 1..=64".into());
            }
            let before_seq = match field("before").trim().trim_start_matches('#') {
                "" => 0,
                text => text.parse().map_err(|_| "\"before\" is a journal number")?,
            };
            Op::History { card: card()?, before_seq, limit }
        }
        "block" => Op::Block { card: card()?, reason: parse_reason(field("reason"))? },
        "unblock" => Op::Unblock { card: card()? },
        "replace" => Op::Replace { card: card()? },
        "close" => Op::Close { card: card()? },
        "setproduct" => {
            let product = field("product")
                .trim()
                .parse::<u8>()
                .map_err(|_| "the product is a number 0..=31")?;
            Op::SetProduct { card: card()?, product }
        }
        _ => return Err(format!("there is no operation {:?}", escape(name))),
    })
}

fn capitalised(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

/// HTML-escapes text for element content and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f3f5f8;color:#1d2430}
header{background:#1f3a5f;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:16px}
header h1{font-size:20px;margin:0}
header span{opacity:.8;font-size:14px}
main{max-width:1100px;margin:0 auto;padding:20px 28px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:14px}
form{background:#fff;border:1px solid #d8dee8;border-radius:8px;padding:14px 16px}
form h2{font-size:15px;margin:0 0 10px}
label{display:block;font-size:12px;color:#566173;margin:6px 0 2px}
input,select{width:100%;padding:7px 8px;border:1px solid #c3ccd9;border-radius:5px;font-size:14px}
button{margin-top:10px;width:100%;padding:8px;border:0;border-radius:5px;background:#2d6cdf;color:#fff;font-size:14px;cursor:pointer}
button.danger{background:#c0392b}
.answer{border-radius:8px;padding:14px 18px;margin-bottom:20px;border:1px solid}
.answer.ok{background:#e8f6ec;border-color:#8fd19e}
.answer.declined{background:#fdf0ef;border-color:#ec9f98}
.answer h2{margin:0 0 6px;font-size:17px}
.answer table{border-collapse:collapse;margin-top:8px;font-size:14px}
.answer td,.answer th{padding:3px 14px 3px 0;text-align:left}
.answer th{color:#566173;font-weight:600}
.big{font-size:20px;font-weight:700;letter-spacing:1px}
.note{font-size:12px;color:#566173;margin-top:18px}
"#;

fn page(console: &Console, answer: Option<&Answer>) -> String {
    let mut html = String::with_capacity(8 * 1024);
    html.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str("<title>citycard counter</title><style>");
    html.push_str(STYLE);
    html.push_str("</style></head><body><header><h1>citycard counter</h1><span>");
    html.push_str(&escape(console.counter.client.terminal_id()));
    html.push_str(" &rarr; ");
    html.push_str(&escape(&console.counter.client.config().server));
    html.push_str("</span></header><main>");
    if let Some(answer) = answer {
        answer_box(&mut html, answer);
    }
    html.push_str("<div class=\"grid\">");
    let cards_note = if console.counter.cards.is_some() {
        ""
    } else {
        "<p class=\"note\">Needs the card: not available without a card reader.</p>"
    };
    let card = "<label>Card number</label><input name=\"card\" inputmode=\"numeric\" autocomplete=\"off\" required>";
    form(
        &mut html,
        "issue",
        "Issue a card",
        "<label>Deposit</label><input name=\"deposit\" value=\"0\" required>",
        "Issue",
        "",
    );
    form(
        &mut html,
        "topup",
        "Top up",
        &format!("{card}<label>Amount</label><input name=\"amount\" required>"),
        "Top up",
        cards_note,
    );
    form(&mut html, "balance", "Balance", card, "Read balance", cards_note);
    form(&mut html, "history", "History", &format!("{card}<label>Entries (1-64)</label><input name=\"limit\" value=\"16\"><label>Older than journal #</label><input name=\"before\" placeholder=\"newest\">"), "Show history", cards_note);
    form(&mut html, "block", "Block", &format!("{card}<label>Reason</label><select name=\"reason\"><option value=\"lost\">Lost</option><option value=\"stolen\">Stolen</option><option value=\"damaged\">Damaged</option><option value=\"fraud\">Fraud suspected</option><option value=\"other\">Other</option></select>"), "Block", "");
    form(&mut html, "unblock", "Unblock", card, "Unblock", "");
    form(&mut html, "replace", "Replace", card, "Replace card", "");
    form(&mut html, "close", "Close and refund", card, "Close card", "");
    form(
        &mut html,
        "setproduct",
        "Set product",
        &format!(
            "{card}<label>Product</label><input name=\"product\" inputmode=\"numeric\" required>"
        ),
        "Set product",
        "",
    );
    html.push_str("</div><p class=\"note\">Amounts in currency units (20 or 20.50). Card numbers are shown masked except a newly issued one.</p></main></body></html>");
    html
}

fn form(html: &mut String, name: &str, title: &str, fields: &str, button: &str, note: &str) {
    let class =
        if matches!(name, "block" | "close" | "replace") { " class=\"danger\"" } else { "" };
    html.push_str(&format!(
        "<form id=\"form-{name}\" method=\"post\" action=\"/op/{name}\"><h2>{title}</h2>{fields}\
         <input type=\"hidden\" name=\"token\" value=\"{}\"><button type=\"submit\"{class}>{button}</button>{note}</form>",
        token()
    ));
}

fn answer_box(html: &mut String, answer: &Answer) {
    let class = if answer.approved { "ok" } else { "declined" };
    html.push_str(&format!(
        "<section id=\"answer\" class=\"answer {class}\" data-status=\"{}\"><h2>{}: {}</h2>",
        escape(answer.status),
        escape(answer.operation),
        escape(&answer.message)
    ));
    html.push_str("<table>");
    if let Some(card) = &answer.card {
        html.push_str(&format!("<tr><th>Card</th><td id=\"card\">{}</td></tr>", escape(card)));
    }
    if let Some(card) = answer.new_card {
        html.push_str(&format!(
            "<tr><th>New card number</th><td class=\"big\" id=\"new-card\">{card}</td></tr>"
        ));
    }
    for field in &answer.fields {
        let id = field.name.replace(' ', "-");
        html.push_str(&format!(
            "<tr><th>{}</th><td id=\"{}\">{}</td></tr>",
            escape(&capitalised(field.name)),
            escape(&id),
            escape(&field.value)
        ));
    }
    if let Some(op_ref) = answer.op_ref {
        html.push_str(&format!("<tr><th>Reference</th><td>{op_ref}</td></tr>"));
    }
    html.push_str("</table>");
    if !answer.history.is_empty() {
        html.push_str("<table id=\"history\"><tr><th>Journal</th><th>Operation</th><th>Status</th><th>Amount</th><th>Balance after</th></tr>");
        for row in &answer.history {
            html.push_str(&format!(
                "<tr><td>#{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                row.journal_seq,
                escape(row.kind),
                escape(row.status),
                escape(&row.amount),
                escape(&row.balance_after)
            ));
        }
        html.push_str("</table>");
    }
    html.push_str("</section>");
}
