//! A process's start time (`/proc/<pid>/stat`, field 22, clock ticks since
//! boot): with the pid, it names one process for the machine's uptime,
//! even after the pid is reused.

/// The start time of process `pid` in clock ticks since boot, or `None`
/// when no such process exists (or its stat file does not parse).
pub fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&text)
}

/// Field 22 of a `stat` line. The command name (field 2) is in parentheses
/// and may itself contain spaces and `)`: fields are counted after the
/// last `)`.
pub fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ')': field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_field_22_past_a_name_with_parens() {
        let line = b"4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(line), Some(987_654));
        assert_eq!(parse_start_time(b"12 (x) S 1"), None);
    }

    #[test]
    fn a_live_child_has_one_and_after_it_is_reaped_it_is_gone() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let pid = c.id() as i32;
        let alive = start_time(pid).expect("a live child's stat");
        assert!(start_time(std::process::id() as i32).is_some_and(|me| me <= alive));
        c.kill().expect("kill");
        c.wait().expect("wait");
        // Reaped: the pid is free, or reused by a later process whose start
        // time is not the child's.
        assert_ne!(start_time(pid), Some(alive));
    }
}
