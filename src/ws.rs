//! WebSocket helpers for hosts that speak the protocol themselves: the handshake's accept
//! key, and an incremental decoder for client frames (RFC 6455).
