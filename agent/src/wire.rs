//! Writing one reply line: the agent's side of the framing in [`crate::protocol`].

use std::io::{self, Write};

use crate::protocol::Reply;

pub(crate) fn write_reply(w: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}
