package logic

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
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return errors.New("token is not three segments")
	}
	header, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return fmt.Errorf("decode header: %w", err)
	}
	names, err := memberNames(header)
	if err != nil {
		return fmt.Errorf("header: %w", err)
	}
	for _, n := range names {
		if n == "crit" {
			return errors.New(`header has "crit": no extension is understood`)
		}
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return fmt.Errorf("decode claims: %w", err)
	}
	// The names Claims decodes, its own and the registered ones (RFC 7519
	// §4.1).
	claimNames := []string{"mid", "key", "rooms", "platform", "accepts", "iss", "sub", "aud", "exp", "nbf", "iat", "jti"}
	if names, err = memberNames(payload); err != nil {
		return fmt.Errorf("claims: %w", err)
	}
	for _, n := range names {
		for _, known := range claimNames {
			if n != known && strings.EqualFold(n, known) {
				return fmt.Errorf("claim %q: the claim is %q (names are case-sensitive)", n, known)
			}
		}
	}
	return nil
}

// memberNames returns the member names of the JSON object in b, refusing
// a name that appears twice.
func memberNames(b []byte) ([]string, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	var names []string
	seen := map[string]bool{}
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("read member name: %w", err)
		}
		name, _ := t.(string)
		if seen[name] {
			return nil, fmt.Errorf("member %q appears twice", name)
		}
		seen[name] = true
		names = append(names, name)
		var skip json.RawMessage
		if err := d.Decode(&skip); err != nil {
			return nil, fmt.Errorf("read member %q: %w", name, err)
		}
	}
	return names, nil
}
