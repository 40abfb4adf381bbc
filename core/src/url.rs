//! Coordinator addresses as users and peers write them.

/// Where a coordinator listens when told nothing else.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Where workers and venomctl look for a coordinator when told nothing else:
/// [`DEFAULT_LISTEN`] as a URL.
pub const DEFAULT_COORDINATOR_URL: &str = "http://127.0.0.1:7070";

/// `host:port` becomes `http://host:port`; a URL with a scheme is kept. Surrounding white
/// space and trailing slashes are dropped.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// Checks that `address` is `HOST:PORT` (with or without an `http://` or `https://` scheme)
/// with a port from 1 to 65535.
pub fn check_host_port(address: &str) -> Result<(), String> {
    let address = address.trim();
    let authority = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    let valid = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(())
    } else {
        Err(format!("`{address}` is not HOST:PORT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_is_the_default_address() {
        assert_eq!(normalize_url(DEFAULT_LISTEN), DEFAULT_COORDINATOR_URL);
    }

    #[test]
    fn urls_are_normalised() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_url(" c2:7070/ "), "http://c2:7070");
        assert_eq!(normalize_url("https://c2:7070"), "https://c2:7070");
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert_eq!(check_host_port("10.0.0.2:7070"), Ok(()));
        assert_eq!(check_host_port("http://c2:7070"), Ok(()));
        assert!(check_host_port("c2").is_err());
        assert!(check_host_port(":7070").is_err());
        assert!(check_host_port("c2:0").is_err());
        assert!(check_host_port("c2:70000").is_err());
    }
}
