//! Server-sent events, incrementally: bytes in as the network delivers them, the
//! `data` of each complete event out. Network reads split events anywhere, and an
//! event's time is the time of the read that completed it.

#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// The `data` lines of the event being read.
    data: Option<String>,
}

impl SseDecoder {
    /// Feeds bytes; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            let line = self.buf[start..end]
                .strip_suffix(b"\r")
                .unwrap_or(&self.buf[start..end]);
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            self.line(&line, &mut events);
        }
        self.buf.drain(..start);
        events
    }

    /// The end of the stream: an event that was not followed by a blank line.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let mut events = Vec::new();
        if !rest.is_empty() {
            self.line(&String::from_utf8_lossy(&rest), &mut events);
        }
        events.extend(self.data.take());
        events.pop()
    }

    fn line(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        // Comments (keep-alive pings) and the other fields (event, id, retry) carry no data.
        let Some(value) = line.strip_prefix("data:") else {
            return;
        };
        let value = value.strip_prefix(' ').unwrap_or(value);
        match &mut self.data {
            Some(d) => {
                d.push('\n');
                d.push_str(value);
            }
            None => self.data = Some(value.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: {\"a\"").is_empty());
        assert!(d.push(b": 1}\n").is_empty());
        assert_eq!(d.push(b"\ndata: [DO"), vec!["{\"a\": 1}"]);
        assert_eq!(d.push(b"NE]\n\n"), vec!["[DONE]"]);
        assert_eq!(d.finish(), None);
    }

    #[test]
    fn crlf_comments_fields_and_multiline_data() {
        let mut d = SseDecoder::default();
        let got = d.push(
            b": ping\r\n\r\nevent: message\r\nid: 3\r\ndata:x\r\ndata: y\r\n\r\ndata: z\n\ndata: tail",
        );
        assert_eq!(got, vec!["x\ny", "z"]);
        assert_eq!(d.finish().as_deref(), Some("tail"));
    }
}
