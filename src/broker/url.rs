//! Broker URLs of the socket engines:
//! `scheme://[user[:password]@]host[:port][,host[:port]…][/path][?key=value[&key=value…]]`,
//! with percent-escapes in the user, the password and the option values. (PostgreSQL URLs go to libpq as they are.)

#![forbid(unsafe_code)]

use crate::error::Error;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// The scheme, lower-cased.
    pub(crate) scheme: String,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    /// One or more `(host, port)`; IPv6 literals without their brackets.
    pub(crate) hosts: Vec<(String, u16)>,
    /// What follows the first `/` after the hosts, without it, up to the `?` ("" when none).
    pub(crate) path: String,
    /// The `key=value` options after the `?`, in order, values percent-decoded.
    pub(crate) query: Vec<(String, String)>,
}

impl BrokerUrl {
    pub(crate) fn parse(url: &str, default_port: u16) -> Result<BrokerUrl, Error> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or(Error::InvalidArgument("the broker URL has no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, options(query)?),
            None => (rest, Vec::new()),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_start_matches('/')),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => match userinfo.split_once(':') {
                Some((user, password)) => (
                    Some(percent_decode(user)?).filter(|user| !user.is_empty()),
                    Some(percent_decode(password)?),
                ),
                None => (Some(percent_decode(userinfo)?), None),
            },
        };
        let hosts = hosts
            .split(',')
            .map(|host| host_and_port(host, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BrokerUrl {
            scheme: scheme.to_ascii_lowercase(),
            user,
            password,
            hosts,
            path: path.to_string(),
            query,
        })
    }

    /// Refuses options no one took: a misspelt option must not be silently ignored.
    pub(crate) fn no_options_left(&self) -> Result<(), Error> {
        match self.query.first() {
            None => Ok(()),
            Some(_) => Err(Error::InvalidArgument(
                "a broker URL has an unknown option (known: ca=, cert=, key= with TLS)",
            )),
        }
    }
}

fn options(query: &str) -> Result<Vec<(String, String)>, Error> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').ok_or(Error::InvalidArgument(
                "a broker URL option is not key=value",
            ))?;
            Ok((key.to_string(), percent_decode(value)?))
        })
        .collect()
}

fn host_and_port(text: &str, default_port: u16) -> Result<(String, u16), Error> {
    let bad_port = Error::InvalidArgument("a broker URL's port is a number from 1 to 65535");
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(Error::InvalidArgument(
            "an IPv6 host in a broker URL lacks its ']'",
        ))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => {
                return Err(Error::InvalidArgument(
                    "a broker URL has junk after its host",
                ));
            }
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(Error::InvalidArgument("a broker URL names no host"));
    }
    let port = match port {
        None => default_port,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(bad_port),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(text: &str) -> Result<String, Error> {
    let bad = || Error::InvalidArgument("a broker URL has a bad percent-escape");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = text.get(at + 1..at + 3).ok_or_else(bad)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let byte = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
            out.push(byte);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::InvalidArgument("a broker URL's escaped parts must be UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part() {
        let url = BrokerUrl::parse("redis://al%40ice:p%3Ass@cache.local:6380/2", 6379).unwrap();
        assert_eq!(url.scheme, "redis");
        assert_eq!(url.user.as_deref(), Some("al@ice"));
        assert_eq!(url.password.as_deref(), Some("p:ss"));
        assert_eq!(url.hosts, vec![("cache.local".to_string(), 6380)]);
        assert_eq!(url.path, "2");
        assert!(url.query.is_empty());

        let url = BrokerUrl::parse("rediss://h/3?ca=/etc/my%20ca.pem&&cert=c.pem", 6379).unwrap();
        assert_eq!(url.path, "3");
        assert_eq!(
            url.query,
            vec![
                ("ca".to_string(), "/etc/my ca.pem".to_string()),
                ("cert".to_string(), "c.pem".to_string())
            ]
        );
        let url = BrokerUrl::parse("tls://u:p@h:1?ca=x", 4222).unwrap();
        assert_eq!((url.path.as_str(), url.query.len()), ("", 1));
        assert_eq!(url.password.as_deref(), Some("p"));

        let url = BrokerUrl::parse("NATS://127.0.0.1", 4222).unwrap();
        assert_eq!(url.scheme, "nats");
        assert_eq!((url.user, url.password), (None, None));
        assert_eq!(url.hosts, vec![("127.0.0.1".to_string(), 4222)]);

        let url = BrokerUrl::parse("redis://:secret@[::1]:7000,h2,[fe80::1]", 6379).unwrap();
        assert_eq!((url.user, url.password.as_deref()), (None, Some("secret")));
        assert_eq!(
            url.hosts,
            vec![
                ("::1".to_string(), 7000),
                ("h2".to_string(), 6379),
                ("fe80::1".to_string(), 6379)
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "redis//h",
            "redis://",
            "redis://h:0",
            "redis://h:99999",
            "redis://h:x",
            "redis://[::1",
            "redis://[::1]x",
            "redis://u%zz@h",
            "redis://u%4@h",
            "redis://h1,,h2",
            "redis://h?ca",
            "redis://h?ca=%zz",
        ] {
            assert_eq!(
                BrokerUrl::parse(bad, 1).err().map(|e| e.errno()),
                Some(libc::EINVAL),
                "{bad}"
            );
        }
    }
}
