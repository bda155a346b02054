{{/* FHIR_AUDIT_<PREFIX>__<NAME> for each of a map of settings (nested names dotted). */}}
{{- define "fap.settingsEnv" -}}
{{- range $name, $value := .settings }}
- name: {{ printf "FHIR_AUDIT_%s__%s" $.prefix ($name | replace "." "__" | upper) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}
