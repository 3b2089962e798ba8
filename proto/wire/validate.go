package wire

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits on the strings clients (and their tokens) give a node. Every such
// string ends up in a registry, a log line or a protobuf message, and
// protobuf refuses to marshal a string that is not UTF-8: one bad room
// name reported in NodeInfo.RoomCount made every RenewOnline fail, until
// logic dropped the node. So they are checked where they enter.
const (
	// MaxRoomLen bounds a room name (and a room grant) in bytes.
	MaxRoomLen = 128
	// MaxKeyLen bounds a connection key in bytes (a UUID is 36).
	MaxKeyLen = 128
	// MaxPlatformLen bounds a client's platform label in bytes.
	MaxPlatformLen = 32
	// MaxTextLen bounds other identifiers cloud nodes report (node id,
	// addresses).
	MaxTextLen = 256
	// MaxClaimRooms bounds the room entries (exact rooms and grants) one
	// token may carry.
	MaxClaimRooms = 64
	// MaxClaimAccepts bounds the operations one token may list.
	MaxClaimAccepts = 1024
)

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid")

// ValidText checks a free-form identifier: at most max bytes of valid
// UTF-8 without control characters. Empty is allowed; callers that need a
// value check for it.
func ValidText(s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrInvalid, len(s), max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: not UTF-8", ErrInvalid)
	}
	for _, r := range s {
		if unicode.IsControl(r) {
			return fmt.Errorf("%w: control character %U", ErrInvalid, r)
		}
	}
	return nil
}

// ValidKey checks a connection key: 1 to MaxKeyLen bytes of UTF-8 with no
// control characters, spaces or commas (keys travel comma-joined).
func ValidKey(s string) error {
	if s == "" {
		return fmt.Errorf("key: %w: empty", ErrInvalid)
	}
	if err := validName(s, MaxKeyLen); err != nil {
		return fmt.Errorf("key: %w", err)
	}
	return nil
}

// ValidPlatform checks a platform label ("web", "android"); empty is
// allowed.
func ValidPlatform(s string) error {
	if err := validName(s, MaxPlatformLen); err != nil {
		return fmt.Errorf("platform: %w", err)
	}
	return nil
}

// ValidRoom checks a room name: "type://id" with both parts non-empty, at
// most MaxRoomLen bytes of UTF-8, no control characters, spaces, commas
// (rooms travel comma-joined in upstream metadata) or '*' (which marks a
// grant pattern).
func ValidRoom(s string) error {
	if err := validName(s, MaxRoomLen); err != nil {
		return fmt.Errorf("room: %w", err)
	}
	if strings.ContainsRune(s, '*') {
		return fmt.Errorf("room: %w: '*' is only allowed at the end of a grant", ErrInvalid)
	}
	typ, id, ok := strings.Cut(s, "://")
	if !ok || typ == "" || id == "" {
		return fmt.Errorf("room: %w: want type://id", ErrInvalid)
	}
	return nil
}

// ValidRoomGrant checks one entry of a token's rooms claim: an exact room
// (ValidRoom) or a pattern ending in '*' ("live://*", "*" for any room),
// whose prefix has no other '*'.
func ValidRoomGrant(s string) error {
	prefix, pattern := strings.CutSuffix(s, "*")
	if !pattern {
		return ValidRoom(s)
	}
	if err := validName(prefix, MaxRoomLen-1); err != nil {
		return fmt.Errorf("room grant: %w", err)
	}
	if strings.ContainsRune(prefix, '*') {
		return fmt.Errorf("room grant: %w: '*' is only allowed at the end", ErrInvalid)
	}
	return nil
}

// IsRoomPattern reports whether a rooms claim entry is a pattern (a grant
// only) rather than a room the client joins.
func IsRoomPattern(s string) bool { return strings.HasSuffix(s, "*") }

// RoomGranted reports whether room is one of grants or matches one of its
// patterns: "live://*" grants every room starting with "live://" (not
// "live2://x"), "*" grants every room.
func RoomGranted(grants []string, room string) bool {
	for _, g := range grants {
		if prefix, ok := strings.CutSuffix(g, "*"); ok {
			if strings.HasPrefix(room, prefix) {
				return true
			}
		} else if g == room {
			return true
		}
	}
	return false
}

// validName is ValidText without spaces or commas, non-empty parts being
// the caller's business.
func validName(s string, max int) error {
	if err := ValidText(s, max); err != nil {
		return err
	}
	for _, r := range s {
		if r == ',' || unicode.IsSpace(r) {
			return fmt.Errorf("%w: %q is not allowed", ErrInvalid, r)
		}
	}
	return nil
}
