package token

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// strictToken checks what encoding/json would let through when it decodes
// a verified token's header and claims: it matches member names without
// regard to case and keeps the last of a duplicated name, so a signed
// {"Rooms":["*"]} or {"rooms":["public://lobby"],"rooms":["*"]} granted
// every room. A duplicated name, a claim name that differs from one
// Claims knows only in case, and a "crit" header (RFC 7515 §4.1.11: it
// names extensions that must be understood, and none is) refuse the token.
func strictToken(token string) error {
	head, rest, ok := strings.Cut(token, ".")
	payload, _, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 {
		return errors.New("token is not three segments")
	}
	var buf [4096]byte // a client's token is at most cloud.max_body_bytes
	header, err := decodeSegment(buf[:0], head)
	if err != nil {
		return fmt.Errorf("decode header: %w", err)
	}
	names, err := memberNames(header)
	if err != nil {
		return fmt.Errorf("header: %w", err)
	}
	for _, n := range names {
		if string(n.in(header)) == "crit" {
			return errors.New(`header has "crit": no extension is understood`)
		}
	}
	claims, err := decodeSegment(buf[len(header):len(header)], payload)
	if err != nil {
		return fmt.Errorf("decode claims: %w", err)
	}
	if names, err = memberNames(claims); err != nil {
		return fmt.Errorf("claims: %w", err)
	}
	for _, n := range names {
		name := n.in(claims)
		for _, known := range claimNames {
			if string(name) != known && bytes.EqualFold(name, []byte(known)) {
				return fmt.Errorf("claim %q: the claim is %q (names are case-sensitive)", string(name), known)
			}
		}
	}
	return nil
}

// claimNames are the names Claims decodes, its own and the registered
// ones (RFC 7519 §4.1).
var claimNames = [...]string{"mid", "key", "rooms", "platform", "accepts", "recover", "iss", "sub", "aud", "exp", "nbf", "iat", "jti"}

// decodeSegment appends the base64url-decoded seg to dst, in dst's array
// when it fits.
func decodeSegment(dst []byte, seg string) ([]byte, error) {
	n := base64.RawURLEncoding.DecodedLen(len(seg))
	if cap(dst)-len(dst) < n {
		dst = make([]byte, 0, n)
	}
	out := dst[len(dst) : len(dst)+n]
	m, err := base64.RawURLEncoding.Decode(out, []byte(seg))
	return out[:m], err
}

// nameSpan is where a member name is in a JSON text, or, when it holds
// escapes, its decoded form. Spans, not slices of the text, so that the
// text can stay in its caller's stack array.
type nameSpan struct {
	lo, hi  int
	decoded string
}

func (n nameSpan) in(b []byte) []byte {
	if n.decoded != "" {
		return []byte(n.decoded)
	}
	return b[n.lo:n.hi]
}

// memberNames returns the member names of the JSON object in b, refusing
// a name that appears twice. b has been decoded by golang-jwt already, so
// it is valid JSON: a scan that follows strings and nesting finds the
// top-level names without decoding the values. A connect used to spend
// 2.8 KB of garbage here with a json.Decoder, which showed in the RSS of
// a node taking 6,000 connects a second.
func memberNames(b []byte) ([]nameSpan, error) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, errors.New("not a JSON object")
	}
	var names []nameSpan
	depth, expectName := 0, false
	for ; i < len(b); i++ {
		switch b[i] {
		case '{', '[':
			depth++
			expectName = depth == 1
		case '}', ']':
			depth--
		case ',':
			expectName = depth == 1
		case '"':
			end, escaped := stringEnd(b, i)
			if end < 0 {
				return nil, errors.New("unterminated string")
			}
			if depth == 1 && expectName {
				span := nameSpan{lo: i + 1, hi: end}
				if escaped {
					// A copy: Unmarshal keeps its input reachable, which would
					// move the caller's stack array to the heap.
					var dec string
					if err := json.Unmarshal(bytes.Clone(b[i:end+1]), &dec); err != nil {
						return nil, fmt.Errorf("member name: %w", err)
					}
					span.decoded = dec
				}
				name := span.in(b)
				for _, n := range names {
					if bytes.Equal(n.in(b), name) {
						return nil, fmt.Errorf("member %q appears twice", string(name))
					}
				}
				names = append(names, span)
				expectName = false
			}
			i = end
		}
	}
	return names, nil
}

// stringEnd returns the index of the quote closing the string that opens
// at b[start], and whether the string holds an escape; -1 if it is not
// closed.
func stringEnd(b []byte, start int) (int, bool) {
	escaped := false
	for j := start + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			escaped = true
			j++
		case '"':
			return j, escaped
		}
	}
	return -1, escaped
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}
