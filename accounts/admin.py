from django.contrib import admin

from .models import Address, ApiToken


@admin.register(Address)
class AddressAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "name", "city", "country", "created_at")
    search_fields = ("owner__username", "owner__email", "name", "city")
    raw_id_fields = ("owner",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "name", "created_at")
    search_fields = ("user__username", "name")
    readonly_fields = ("user", "name", "digest", "created_at")
